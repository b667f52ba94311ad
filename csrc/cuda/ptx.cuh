// The PTX the binary tensor-core kernels use, one wrapper each, so the kernels
// read as plain CUDA and an emulator (tests/cuda_emu) can stand in for them.
#pragma once
#include <stdint.h>

namespace ctmq {

// D = C + popc(A AND B) on a 16x8x256 bit tile; A row-major (16 x 256 bits),
// B column-major (256 x 8 bits). Fragments (PTX ISA, "Matrix Fragments for
// mma.m16n8k256"; g = lane / 4, t = lane % 4):
//   a0: row g,     bits [32t, 32t + 32)   a1: row g + 8, same bits
//   a2: row g,     bits 128 + [32t, ...)  a3: row g + 8, same bits
//   b0: column g,  bits [32t, 32t + 32)   b1: column g, 128 + [32t, ...)
//   c0, c1: row g, columns 2t, 2t + 1     c2, c3: row g + 8, same columns
// The AND form runs natively on sm_80 and sm_90 (Hopper emulates the XOR form).
__device__ __forceinline__ void mma_b1_and_popc(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Asynchronous global -> shared copy of Bytes (4, 8 or 16); zero-fills the
// destination instead when !valid (src must still be a mapped address).
template <int Bytes>
__device__ __forceinline__ void cp_async_zfill(void* smem, const void* src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? Bytes : 0;
  if constexpr (Bytes == 16) {  // .cg: cache in L2 only (the tile is reused from shared memory)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(Bytes),
                 "r"(src_bytes));
  }
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N of this thread's committed copy groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace ctmq
