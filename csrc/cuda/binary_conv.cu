// Implicit-GEMM binary convolution on mma.sync m16n8k256 b1 (AND + POPC).
//
// Hopper emulates the XOR form of the binary MMA (about 6x slower) but runs the
// AND form natively, so each 256-bit step accumulates popc(a AND b), and the
// epilogue recovers the XOR count exactly:
//   popc(a XOR b) = popc(a) + popc(b) - 2 popc(a AND b)
// summed over the valid taps of each output (a tap outside the image holds
// zero bits: it adds nothing to the AND sum, and its popc(b) is subtracted).
// Output = C * valid_taps - 2 * xor_count, then * scale + bias + residual, as
// the CPU and Triton kernels compute it.
//
// Block: 4 warps, 64 output pixels x 64 output channels; warp w owns pixels
// 16w..16w+15 and all 64 channels (8 n-tiles of 8). Fragments follow the PTX
// layout of m16n8k256 (.b1): a0/a1 rows g / g+8, k bits [32t, 32t+32); a2/a3 the
// same rows, k + 128; b0/b1 column g, k [32t, 32t+32) and + 128 (g = lane / 4,
// t = lane % 4). Operands come straight from global memory (L1/L2) in this
// first version; staging through shared memory with cp.async is the next step.
#include "binary_conv.cuh"

namespace ctmq {
namespace {

constexpr int kWarps = 4;
constexpr int kBlockM = 16 * kWarps;
constexpr int kBlockN = 64;
constexpr int kTilesN = kBlockN / 8;

__device__ __forceinline__ void mma_and_popc(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

struct Pixel {
  int n, oh, ow;
  bool ok;
};

__device__ __forceinline__ Pixel pixel_of(const BinaryConvParams& p, long m) {
  Pixel px;
  const long M = (long)p.N * p.OH * p.OW;
  px.ok = m < M;
  const long mm = px.ok ? m : 0;
  px.n = (int)(mm / ((long)p.OH * p.OW));
  const int r = (int)(mm % ((long)p.OH * p.OW));
  px.oh = r / p.OW;
  px.ow = r % p.OW;
  return px;
}

// Word `j` of the activation at tap (kh, kw) of pixel px, 0 outside the image.
__device__ __forceinline__ uint32_t act_word(const BinaryConvParams& p, const Pixel& px, int kh,
                                             int kw, int j) {
  const int ih = px.oh * p.sh - p.ph + kh * p.dh;
  const int iw = px.ow * p.sw - p.pw + kw * p.dw;
  if (!px.ok || j >= p.Cw || ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return 0u;
  return __ldg(p.x + (((long)px.n * p.H + ih) * p.W + iw) * p.Cw + j);
}

__device__ __forceinline__ bool tap_valid(const BinaryConvParams& p, const Pixel& px, int kh, int kw) {
  const int ih = px.oh * p.sh - p.ph + kh * p.dh;
  const int iw = px.ow * p.sw - p.pw + kw * p.dw;
  return ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
}

// popc of the pixel's valid taps' activation words, and how many taps are valid.
__device__ void pixel_counts(const BinaryConvParams& p, const Pixel& px, int& popc_a, int& valid) {
  popc_a = 0;
  valid = 0;
  for (int kh = 0; kh < p.KH; ++kh)
    for (int kw = 0; kw < p.KW; ++kw) {
      if (!tap_valid(p, px, kh, kw)) continue;
      ++valid;
      for (int j = 0; j < p.Cw; ++j) popc_a += __popc(act_word(p, px, kh, kw, j));
    }
}

__device__ void epilogue(const BinaryConvParams& p, const Pixel& px, long m, int oc, int and_count,
                         int popc_a, int valid) {
  if (!px.ok || oc >= p.O) return;
  const int T = p.KH * p.KW;
  int popc_w = 0;  // popc of the weight over the valid taps of this pixel
  for (int kh = 0; kh < p.KH; ++kh)
    for (int kw = 0; kw < p.KW; ++kw)
      if (tap_valid(p, px, kh, kw)) popc_w += p.tap_popc[(long)oc * T + kh * p.KW + kw];
  const int xor_count = popc_a + popc_w - 2 * and_count;
  float y = (float)(valid * p.C - 2 * xor_count);  // exact below 2^24
  if (p.scale) y = __fmul_rn(y, p.scale[oc]);      // no FMA: the CPU kernel's rounding
  if (p.bias) y = __fadd_rn(y, p.bias[oc]);
  const long M = (long)p.OH * p.OW;
  const long pix = m % M;
  const long idx = ((long)px.n * p.O + oc) * M + pix;
  if (p.residual) y = __fadd_rn(y, p.residual[idx]);
  if (p.out) {
    p.out[idx] = y;
  } else if (y >= 0.f) {
    const int Ow = (p.O + 31) / 32;
    atomicOr(p.packed + m * Ow + (oc >> 5), 1u << (oc & 31));
  }
}

__global__ void __launch_bounds__(32 * kWarps) binary_conv_bmma_kernel(const BinaryConvParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const long m_base = (long)blockIdx.x * kBlockM + warp * 16;
  const int oc_base = blockIdx.y * kBlockN;
  const long m0 = m_base + g, m1 = m_base + g + 8;
  const Pixel px0 = pixel_of(p, m0), px1 = pixel_of(p, m1);
  int acc[kTilesN][4] = {};
  for (int kh = 0; kh < p.KH; ++kh) {
    for (int kw = 0; kw < p.KW; ++kw) {
      for (int j0 = 0; j0 < p.Cw; j0 += 8) {  // 256 bits per step
        const uint32_t a0 = act_word(p, px0, kh, kw, j0 + t);
        const uint32_t a1 = act_word(p, px1, kh, kw, j0 + t);
        const uint32_t a2 = act_word(p, px0, kh, kw, j0 + 4 + t);
        const uint32_t a3 = act_word(p, px1, kh, kw, j0 + 4 + t);
#pragma unroll
        for (int nt = 0; nt < kTilesN; ++nt) {
          const int oc = oc_base + nt * 8 + g;
          const uint32_t* wrow = p.w + (((long)oc * p.KH + kh) * p.KW + kw) * p.Cw;
          const bool ok = oc < p.O;
          const uint32_t b0 = ok && j0 + t < p.Cw ? __ldg(wrow + j0 + t) : 0u;
          const uint32_t b1 = ok && j0 + 4 + t < p.Cw ? __ldg(wrow + j0 + 4 + t) : 0u;
          mma_and_popc(acc[nt], a0, a1, a2, a3, b0, b1);
        }
      }
    }
  }
  int popc0, valid0, popc1, valid1;
  pixel_counts(p, px0, popc0, valid0);
  pixel_counts(p, px1, popc1, valid1);
#pragma unroll
  for (int nt = 0; nt < kTilesN; ++nt) {
    const int oc = oc_base + nt * 8 + 2 * t;  // c0/c2: column 2t, c1/c3: 2t + 1
    epilogue(p, px0, m0, oc, acc[nt][0], popc0, valid0);
    epilogue(p, px0, m0, oc + 1, acc[nt][1], popc0, valid0);
    epilogue(p, px1, m1, oc, acc[nt][2], popc1, valid1);
    epilogue(p, px1, m1, oc + 1, acc[nt][3], popc1, valid1);
  }
}

}  // namespace

cudaError_t launch_binary_conv_bmma(const BinaryConvParams& p, cudaStream_t stream) {
  const long M = (long)p.N * p.OH * p.OW;
  if (M == 0 || p.O == 0) return cudaSuccess;
  if (p.packed) {
    const cudaError_t err = cudaMemsetAsync(p.packed, 0, sizeof(uint32_t) * M * ((p.O + 31) / 32), stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((unsigned)((M + kBlockM - 1) / kBlockM), (unsigned)((p.O + kBlockN - 1) / kBlockN));
  binary_conv_bmma_kernel<<<grid, 32 * kWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ctmq
