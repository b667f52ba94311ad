// Implicit-GEMM binary convolution on mma.sync m16n8k256 b1 (AND + POPC).
//
// GEMM view: rows = output pixels (N*OH*OW), columns = output channels, K =
// the packed words of the receptive field, taps outer and channel words inner
// (K = KH*KW*Cw words; the weight's (O, KH, KW, Cw) layout is already that).
// K is walked 8 words (256 bits, one mma k-step) at a time straight across tap
// boundaries, so C = 64 (2 words a tap) does not pad each tap to 256 bits.
//
// Hopper emulates the XOR form of the binary MMA (about 6x slower) but runs the
// AND form natively, so the tiles accumulate popc(a AND b) and the epilogue
// recovers the XOR count exactly:
//   popc(a XOR b) = popc(a) + popc(b) - 2 popc(a AND b)
// over the valid taps of each output. Taps outside the image and K past the end
// are zero-filled in shared memory: they add nothing to popc(a AND b) or
// popc(a); popc(b) is summed over the valid taps only. popc(a) is counted from
// the A fragments as they pass (each lane sees a quarter of its rows' words).
// Output = C * valid_taps - 2 * xor_count, then * scale + bias + residual as the
// CPU and Triton kernels compute it; packed output is the bit (y >= 0).
//
// Block: 8 warps, 128 pixels x 64 channels; warp (wm, wn) owns pixels
// 32wm..32wm+31 (2 m-tiles) and channels 32wn..32wn+31 (4 n-tiles). K tiles go
// global -> shared with cp.async (16/8/4-byte copies, zero-filling the invalid
// ones), kStages deep; the accumulators leave through shared memory so that
// each thread writes one pixel's 32 channels (coalesced floats across the warp,
// or one whole word of packed bits).
#include "binary_conv.cuh"
#ifndef CTMQ_CUDA_EMULATION
#include "ptx.cuh"
#endif

namespace ctmq {
namespace {

constexpr int kWarpsM = 4, kWarpsN = 2, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kMTiles = 2, kNTiles = 4;
constexpr int kBlockM = 16 * kMTiles * kWarpsM;  // 128 pixels
constexpr int kBlockN = 8 * kNTiles * kWarpsN;   // 64 channels
constexpr int kStageWords = 8;                   // 256 bits of K per stage
// Row stride of a shared tile in words: the +4 puts the 8 rows a fragment load
// touches (g = 0..7, words t = 0..3) on 32 different banks; 48 bytes keeps
// 16-byte copies aligned.
constexpr int kStride = kStageWords + 4;
constexpr int kStages = 4;
constexpr int kATile = kBlockM * kStride, kBTile = kBlockN * kStride;
// Row stride of the accumulator tile (ints): odd, so the epilogue's reads (one
// row per lane, same column) hit 32 different banks.
constexpr int kCStride = kBlockN + 1;
static_assert(kBlockM * kCStride <= kStages * (kATile + kBTile), "and_tile fits the K tiles' memory");
static_assert(kThreads == kBlockM * kBlockN / 32, "epilogue: one thread per pixel and output word");

struct Pixel {
  int m;  // GEMM row (the launcher keeps N*OH*OW below 2^31)
  int n, oh, ow;
  bool ok;  // m < N*OH*OW
};

__device__ __forceinline__ Pixel pixel_of(const BinaryConvParams& p, int m) {
  const int hw = p.OH * p.OW;
  Pixel px;
  px.m = m;
  px.ok = m < p.N * hw;
  const int mm = px.ok ? m : 0;
  px.n = mm / hw;
  const int r = mm - px.n * hw;
  px.oh = r / p.OW;
  px.ow = r - px.oh * p.OW;
  return px;
}

// One pixel row of the A tile, as this thread's copies need it: the image's
// first word and the top-left input coordinate of the receptive field (pushed
// far outside the image for rows past the end, so that every tap is invalid).
struct ARow {
  const uint32_t* image;
  int ih0, iw0;
};

__device__ __forceinline__ ARow a_row_of(const BinaryConvParams& p, int m) {
  const Pixel px = pixel_of(p, m);
  ARow r;
  r.image = p.x + (long)px.n * p.H * p.W * p.Cw;
  r.ih0 = px.ok ? px.oh * p.sh - p.ph : -(1 << 30);
  r.iw0 = px.ow * p.sw - p.pw;
  return r;
}

template <int VW>
struct Loader {
  static constexpr int kChunksPerRow = kStageWords / VW;
  static constexpr int kRows = kBlockM * kChunksPerRow / kThreads;  // A rows per thread
  static_assert(kThreads % kChunksPerRow == 0, "a thread's chunks share one column");
  ARow rows[kRows];
};

// Copies stage `s` of K (words [8s, 8s + 8)) of this block's A and B tiles into
// shared memory, VW words per cp.async; invalid words are zero-filled.
template <int VW>
__device__ __forceinline__ void load_stage(const BinaryConvParams& p, const Loader<VW>& ld, uint32_t* As,
                                           uint32_t* Bs, int block_n, int s, int Kw) {
  using L = Loader<VW>;
  const int tid = threadIdx.x;
  const int col = (tid % L::kChunksPerRow) * VW;  // word within the stage
  const int k = s * kStageWords + col;
  const bool k_ok = k < Kw;
  // VW divides Cw, so the VW words starting at k lie in one tap
  const int tap = k_ok ? k / p.Cw : 0;
  const int j = k - tap * p.Cw;
  const int kh = tap / p.KW, kw = tap - kh * p.KW;
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    const int row = tid / L::kChunksPerRow + i * (kThreads / L::kChunksPerRow);
    const int ih = ld.rows[i].ih0 + kh * p.dh, iw = ld.rows[i].iw0 + kw * p.dw;
    const bool ok = k_ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
    const uint32_t* src = ok ? ld.rows[i].image + ((long)ih * p.W + iw) * p.Cw + j : p.x;
    cp_async_zfill<4 * VW>(As + row * kStride + col, src, ok);
  }
#pragma unroll
  for (int c = tid; c < kBlockN * L::kChunksPerRow; c += kThreads) {
    const int row = c / L::kChunksPerRow;
    const int oc = block_n + row;
    const bool ok = k_ok && oc < p.O;
    const uint32_t* src = ok ? p.w + (long)oc * Kw + k : p.w;
    cp_async_zfill<4 * VW>(Bs + row * kStride + col, src, ok);
  }
}

// Calls f(tap) for each tap (kh * KW + kw) of px's window inside the image.
template <class F>
__device__ __forceinline__ void for_each_tap_inside(const BinaryConvParams& p, const Pixel& px, F&& f) {
  for (int kh = 0; kh < p.KH; ++kh) {
    const int ih = px.oh * p.sh - p.ph + kh * p.dh;
    if (ih < 0 || ih >= p.H) continue;
    for (int kw = 0; kw < p.KW; ++kw) {
      const int iw = px.ow * p.sw - p.pw + kw * p.dw;
      if (iw >= 0 && iw < p.W) f(kh * p.KW + kw);
    }
  }
}

__device__ __forceinline__ int valid_taps(const BinaryConvParams& p, const Pixel& px) {
  int valid = 0;
  for_each_tap_inside(p, px, [&](int) { ++valid; });
  return valid;
}

// popc of channel oc's weight over the taps of px inside the image.
__device__ int weight_popc_inside(const BinaryConvParams& p, const Pixel& px, int oc) {
  const int32_t* row = p.tap_popc + (long)oc * p.KH * p.KW;
  int sum = 0;
  for_each_tap_inside(p, px, [&](int tap) { sum += row[tap]; });
  return sum;
}

template <int VW>
__global__ void __launch_bounds__(kThreads, 2) binary_conv_bmma_kernel(const BinaryConvParams p) {
  // The K pipeline's tiles, then (after the last stage) the accumulator tile.
  __shared__ __align__(16) uint32_t smem[kStages * (kATile + kBTile)];
  __shared__ int w_popc_total[kBlockN];  // popc of each channel's whole weight
  __shared__ int a_popc[kBlockM];        // popc of each pixel's receptive field
  uint32_t* const smem_a = smem;
  uint32_t* const smem_b = smem + kStages * kATile;
  int* const and_tile = reinterpret_cast<int*>(smem);  // [kBlockM][kCStride]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  const int block_m = blockIdx.x * kBlockM;
  const int block_n = blockIdx.y * kBlockN;
  const int T = p.KH * p.KW, Kw = T * p.Cw;
  const int num_k = (Kw + kStageWords - 1) / kStageWords;

  Loader<VW> ld;
#pragma unroll
  for (int i = 0; i < Loader<VW>::kRows; ++i)
    ld.rows[i] =
        a_row_of(p, block_m + tid / Loader<VW>::kChunksPerRow + i * (kThreads / Loader<VW>::kChunksPerRow));
  if (tid < kBlockN) {
    int sum = 0;
    if (block_n + tid < p.O)
      for (int i = 0; i < T; ++i) sum += p.tap_popc[(long)(block_n + tid) * T + i];
    w_popc_total[tid] = sum;
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k) load_stage<VW>(p, ld, smem_a + s * kATile, smem_b + s * kBTile, block_n, s, Kw);
    cp_async_commit();  // an empty group keeps the count of pending groups uniform
  }

  int acc[kMTiles][kNTiles][4] = {};
  int popc_a[kMTiles][2] = {};  // rows g and g + 8 of each m-tile, this lane's words only
  for (int s = 0; s < num_k; ++s) {
    cp_async_wait<kStages - 2>();  // this thread's copies of stage s have landed
    __syncthreads();               // ... everyone's; and stage s - 1's slot is free again
    const int next = s + kStages - 1;
    if (next < num_k) {
      const int slot = next % kStages;
      load_stage<VW>(p, ld, smem_a + slot * kATile, smem_b + slot * kBTile, block_n, next, Kw);
    }
    cp_async_commit();

    const uint32_t* As = smem_a + (s % kStages) * kATile;
    const uint32_t* Bs = smem_b + (s % kStages) * kBTile;
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const uint32_t* r0 = As + (wm * 32 + mt * 16 + g) * kStride;
      const uint32_t* r1 = r0 + 8 * kStride;
      a[mt][0] = r0[t];
      a[mt][1] = r1[t];
      a[mt][2] = r0[4 + t];
      a[mt][3] = r1[4 + t];
      popc_a[mt][0] += __popc(a[mt][0]) + __popc(a[mt][2]);
      popc_a[mt][1] += __popc(a[mt][1]) + __popc(a[mt][3]);
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const uint32_t* col = Bs + (wn * 32 + nt * 8 + g) * kStride;
      const uint32_t b0 = col[t], b1 = col[4 + t];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        mma_b1_and_popc(acc[mt][nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the K tiles: their memory becomes and_tile

  // Accumulators -> shared memory, so that the epilogue can give each thread one
  // pixel and 32 channels: coalesced float stores, whole words of packed bits.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wm * 32 + mt * 16 + h * 8 + g;
      int pa = popc_a[mt][h];  // the 4 lanes of a group each saw a quarter of the row
      pa += __shfl_xor_sync(0xffffffffu, pa, 1);
      pa += __shfl_xor_sync(0xffffffffu, pa, 2);
      if (wn == 0 && t == 0) a_popc[row] = pa;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          and_tile[row * kCStride + wn * 32 + nt * 8 + 2 * t + e] = acc[mt][nt][2 * h + e];
    }
  }
  __syncthreads();

  const int row = tid % kBlockM;        // consecutive threads: consecutive pixels
  const int c0 = (tid / kBlockM) * 32;  // 32 channels: one word of packed output
  const Pixel px = pixel_of(p, block_m + row);
  const int word = (block_n + c0) / 32;
  if (!px.ok || block_n + c0 >= p.O) return;
  const int valid = valid_taps(p, px);
  const int pa = a_popc[row];
  const long hw = (long)p.OH * p.OW;
  const long pix = px.m - px.n * hw;  // within the image
  uint32_t bits = 0;
  for (int i = 0; i < 32; ++i) {
    const int c = c0 + i, oc = block_n + c;
    if (oc >= p.O) break;
    const int popc_w = valid == T ? w_popc_total[c] : weight_popc_inside(p, px, oc);
    const int xor_count = pa + popc_w - 2 * and_tile[row * kCStride + c];
    float y = (float)(valid * p.C - 2 * xor_count);  // exact below 2^24
    if (p.scale) y = __fmul_rn(y, p.scale[oc]);      // no FMA: the CPU kernel's rounding
    if (p.bias) y = __fadd_rn(y, p.bias[oc]);
    const long idx = ((long)px.n * p.O + oc) * hw + pix;
    if (p.residual) y = __fadd_rn(y, p.residual[idx]);
    if (p.out) p.out[idx] = y;
    bits |= (uint32_t)(y >= 0.f) << i;
  }
  if (p.packed) p.packed[(long)px.m * ((p.O + 31) / 32) + word] = bits;
}

}  // namespace

BinaryConvPlan plan_binary_conv(const BinaryConvParams& p) {
  const long M = (long)p.N * p.OH * p.OW;
  BinaryConvPlan plan;
  plan.grid_x = (unsigned)((M + kBlockM - 1) / kBlockM);
  plan.grid_y = (unsigned)((p.O + kBlockN - 1) / kBlockN);
  // A cp.async of VW words needs VW | Cw (one tap) and VW-word-aligned bases.
  const auto aligned = [&](int words) {
    return p.Cw % words == 0 && reinterpret_cast<uintptr_t>(p.x) % (4 * words) == 0 &&
           reinterpret_cast<uintptr_t>(p.w) % (4 * words) == 0;
  };
  plan.vec_words = aligned(4) ? 4 : aligned(2) ? 2 : 1;
  return plan;
}

#ifndef CTMQ_CUDA_EMULATION
cudaError_t launch_binary_conv_bmma(const BinaryConvParams& p, cudaStream_t stream) {
  const BinaryConvPlan plan = plan_binary_conv(p);
  if (plan.grid_x == 0 || plan.grid_y == 0) return cudaSuccess;
  if ((long)plan.grid_x * kBlockM >= (1L << 31)) return cudaErrorInvalidValue;  // int pixel index
  const dim3 grid(plan.grid_x, plan.grid_y);
  switch (plan.vec_words) {
    case 4:
      binary_conv_bmma_kernel<4><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 2:
      binary_conv_bmma_kernel<2><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      binary_conv_bmma_kernel<1><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}
#else
// The emulator's launcher: each block's kThreads threads run as host threads.
void emulate_binary_conv_bmma(const BinaryConvParams& p) {
  const BinaryConvPlan plan = plan_binary_conv(p);
  const dim3 grid(plan.grid_x, plan.grid_y);
  switch (plan.vec_words) {
    case 4:
      emu::launch(binary_conv_bmma_kernel<4>, grid, kThreads, p);
      break;
    case 2:
      emu::launch(binary_conv_bmma_kernel<2>, grid, kThreads, p);
      break;
    default:
      emu::launch(binary_conv_bmma_kernel<1>, grid, kThreads, p);
      break;
  }
}
#endif

}  // namespace ctmq
