// ctmq/_native as a Python extension module: an empty module whose shared
// library carries the native runtime's C API (ctmq_runtime.h), which
// ctmq/deploy/native.py calls through ctypes. No torch, no Python objects.
#include <Python.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    "_native",
    "ctmq's native runtime (the C API of ctmq_runtime.h; use ctmq.deploy.load(..., engine='native'))",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr};

PyMODINIT_FUNC PyInit__native(void) {
  return PyModule_Create(&native_module);
}
