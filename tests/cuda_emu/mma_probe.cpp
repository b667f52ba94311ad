// Runs mma.sync m16n8k256 b1 AND.POPC on given fragments, one warp a set:
// built with nvcc (-x cu) it runs the GPU instruction; built with g++ and
// -DCTMQ_CUDA_EMULATION it runs the emulator's model of it. Same inputs, same
// outputs expected: tests/test_csrc_cuda.py compares the two on a GPU machine
// and the emulator with an independent NumPy model of the PTX layout anywhere.
//   mma_probe IN OUT SETS: IN holds SETS x 32 lanes x 6 words (a0..a3, b0, b1),
//   OUT gets SETS x 32 lanes x 4 ints (d0..d3, from c = lane, 2 lane, 3 lane, 7).
#ifdef CTMQ_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include "ptx.cuh"
#endif

#include <cstdio>
#include <cstdlib>
#include <vector>

struct Probe {
  const uint32_t* in;
  int* out;
};

__global__ void mma_probe_kernel(const Probe p) {
  const int lane = threadIdx.x % 32, set = blockIdx.x;
  const uint32_t* r = p.in + (set * 32 + lane) * 6;
  int c[4] = {lane, 2 * lane, 3 * lane, 7};  // a nonzero C: the sum accumulates onto it
  ctmq::mma_b1_and_popc(c, r[0], r[1], r[2], r[3], r[4], r[5]);
  for (int i = 0; i < 4; ++i) p.out[(set * 32 + lane) * 4 + i] = c[i];
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: mma_probe IN OUT SETS\n");
    return 2;
  }
  const int sets = std::atoi(argv[3]);
  std::vector<uint32_t> in(sets * 32 * 6);
  std::vector<int> out(sets * 32 * 4, -1);
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(in.data(), 4, in.size(), f) != in.size()) {
    std::fprintf(stderr, "cannot read %s\n", argv[1]);
    return 2;
  }
  std::fclose(f);
#ifdef CTMQ_CUDA_EMULATION
  emu::launch(mma_probe_kernel, dim3(sets), 32, Probe{in.data(), out.data()});
#else
  uint32_t* d_in = nullptr;
  int* d_out = nullptr;
  const auto check = [](cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
      std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
      std::exit(1);
    }
  };
  check(cudaMalloc(&d_in, in.size() * 4), "cudaMalloc");
  check(cudaMalloc(&d_out, out.size() * 4), "cudaMalloc");
  check(cudaMemcpy(d_in, in.data(), in.size() * 4, cudaMemcpyHostToDevice), "copy in");
  check(cudaMemset(d_out, 0xff, out.size() * 4), "poison out");
  mma_probe_kernel<<<sets, 32> > >(Probe{d_in, d_out});
  check(cudaGetLastError(), "launch");
  check(cudaMemcpy(out.data(), d_out, out.size() * 4, cudaMemcpyDeviceToHost), "copy out");
#endif
  f = std::fopen(argv[2], "wb");
  if (!f || std::fwrite(out.data(), 4, out.size(), f) != out.size()) return 1;
  std::fclose(f);
  return 0;
}
