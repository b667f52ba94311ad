/* ctmq native runtime: runs a ctmq artifact (`ctmq export`) with nothing but
 * the C++ standard library: the same file checks as ctmq.deploy, the same
 * binary kernels (AVX-512 VPOPCNTDQ / AVX2 / NEON / scalar, chosen at run
 * time), its own threads.
 *
 * Every function that can fail returns NULL or a nonzero status and writes
 * one line saying why into `err` (when err_size > 0); no exception crosses
 * this interface. A model may be used from one thread at a time.
 */
#ifndef CTMQ_RUNTIME_H
#define CTMQ_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ctmq_model ctmq_model;

typedef struct ctmq_options {
  /* worker threads, the caller included; 0: all hardware threads */
  int threads;
  /* NULL or "auto": the best the CPU has; or "avx512-vpopcntdq", "avx2", "neon", "scalar" */
  const char* cpu_path;
} ctmq_options;

/* The runtime's version, e.g. "0.1.0". */
const char* ctmq_version(void);

/* Open an artifact from a file or from memory (the bytes are copied); NULL on error. */
ctmq_model* ctmq_open(const char* path, const ctmq_options* options, char* err, size_t err_size);
ctmq_model* ctmq_open_memory(const void* data, size_t size, const ctmq_options* options, char* err,
                             size_t err_size);
void ctmq_close(ctmq_model* model);

/* What the model takes and gives. */
int ctmq_input_channels(const ctmq_model* model);
int ctmq_input_size(const ctmq_model* model); /* images are size x size */
/* the normalization the model expects: input = (pixel / 255 - mean[c]) / std[c] */
const float* ctmq_input_mean(const ctmq_model* model);
const float* ctmq_input_std(const ctmq_model* model);
int ctmq_num_classes(const ctmq_model* model);
const char* ctmq_class_name(const ctmq_model* model, int index); /* NULL out of range */
const char* ctmq_cpu_path(const ctmq_model* model);              /* the binary kernels' path */

/* Logits (n, classes) of n normalized images, float32 NCHW (n, C, size, size). 0 on success. */
int ctmq_run(ctmq_model* model, const float* images, int n, float* logits, char* err, size_t err_size);

/* The same from 8-bit pixels at the model's size, channels interleaved (n, size, size, C),
 * normalized as the model declares. 0 on success. */
int ctmq_run_pixels(ctmq_model* model, const uint8_t* pixels, int n, float* logits, char* err,
                    size_t err_size);

/* The k largest softmax probabilities of one row of logits, largest first. */
void ctmq_topk(const float* logits, int classes, int k, int* indices, float* probabilities);

#ifdef __cplusplus
}
#endif

#endif /* CTMQ_RUNTIME_H */
