// FlashAttention-2-style forward on tensor cores (sm_80+): each warp owns 16 query rows of a
// BLOCK_M-row query tile, streams BLOCK_N-key tiles of K and V through shared memory
// (cp.async, the V load overlapping Q K^T and the next K load overlapping P V), keeps the
// softmax online in fp32 and writes out and LSE. The same kernel with one warp and a
// KV-split grid is the decode path (L <= 16): each CTA covers a slice of the keys, writes a
// partial result with its LSE, and a second kernel merges the slices by their LSE.
// Varlen and KV-cache problems run the same kernels: each CTA finds its sequence's rows and
// length (Sequence), CTAs past the end of a shorter sequence exit at once.
#pragma once

#include "attention_common.cuh"
#include "attention_launch.h"

namespace fastattn {
namespace attn {

template <typename Element_, int HEAD_DIM, int NUM_WARPS, int BLOCK_N>
struct FwdConfig {
  using Element = Element_;
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kNumWarps = NUM_WARPS;
  static constexpr int kThreads = NUM_WARPS * kWarpSize;
  static constexpr int kBlockM = 16 * NUM_WARPS;  // one 16-row mma tile per warp
  static constexpr int kBlockN = BLOCK_N;
  using QTile = SmemTile<Element, kBlockM, HEAD_DIM>;  // [BLOCK_M, E]
  using KVTile = SmemTile<Element, kBlockN, HEAD_DIM>;  // [BLOCK_N, E]
  static constexpr int kSmemBytes = QTile::kBytes + 2 * KVTile::kBytes;
  static_assert(kBlockN % 16 == 0, "keys are the k dim of P V: multiples of 16");
  static_assert(kSmemBytes <= 227 * 1024, "tiles must fit in shared memory");
};

// 8 warps x 16 rows; 64-key tiles keep the per-thread state (E/2 output + 32 score floats)
// within the register file for E <= 128, 32-key tiles for the wider heads.
template <typename Element, int HEAD_DIM>
using FwdMainConfig = FwdConfig<Element, HEAD_DIM, 8, fwd_block_n(HEAD_DIM)>;
// Decode: L <= 16 fits one warp's rows; the keys are spread over CTAs instead.
template <typename Element, int HEAD_DIM>
using FwdDecodeConfig = FwdConfig<Element, HEAD_DIM, 1, fwd_block_n(HEAD_DIM)>;

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_fwd_kernel(const AttentionParams p) {
  using Element = typename Cfg::Element;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, E = Cfg::kHeadDim;
  constexpr int kScoreTiles = BN / 8, kOutTiles = E / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const typename Cfg::QTile q_tile{reinterpret_cast<Element*>(smem)};
  const typename Cfg::KVTile k_tile{q_tile.data + Cfg::QTile::kElements};
  const typename Cfg::KVTile v_tile{k_tile.data + Cfg::KVTile::kElements};

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int h = blockIdx.y;
  const int b = blockIdx.z / p.num_splits, split = blockIdx.z % p.num_splits;
  const int hk = h / query_heads_per_kv_head(p);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const Sequence seq(p, b);
  if (i0 >= seq.q_len) return;  // the grid covers the longest sequence

  const auto q = seq.q_rows<Element>(p.q, b, h, p.q_stride[0], p.q_stride[1], p.q_stride[2]);
  const auto k = seq.kv_rows<Element>(p.k, hk, p.k_stride[0], p.k_stride[1], p.k_stride[2], MissingRows::kNaN);
  const auto v = seq.kv_rows<Element>(p.v, hk, p.v_stride[0], p.v_stride[1], p.v_stride[2]);
  const int64_t lse_row0 = seq.lse_row0(p, b, h);
  const ScoreMod mod(p, seq, b, h, sizeof(Element));

  // Whole key tiles outside the window are never visited.
  int64_t j_begin, j_end;
  mod.key_range(i0, i0 + BM - 1, j_begin, j_end);
  const int n_first = static_cast<int>(j_begin / BN);
  const int n_last = j_end > j_begin ? static_cast<int>((j_end + BN - 1) / BN) : n_first;
  const int per_split = (n_last - n_first + p.num_splits - 1) / p.num_splits;
  const int n_begin = n_first + split * per_split;
  const int n_end = min(n_last, n_begin + per_split);

  // This thread's two rows of the warp's 16 (mma d-layout rows g and g + 8).
  const int64_t rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  float out_acc[kOutTiles][4];  // [16, E] per warp
  zero(out_acc);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's columns only; quad-reduced at the end

  if (n_begin < n_end) {
    q_tile.template load_async<Cfg::kThreads>(q, i0, seq.q_len, tid);
    k_tile.template load_async<Cfg::kThreads>(k, int64_t{n_begin} * BN, seq.kv_len, tid);
    cp_async_commit();
  }
  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    const int64_t j0 = int64_t{n_block} * BN;
    const bool active = mod.tile_has_visible<Element, BM, BN, Cfg::kThreads>(i0, j0, tid);
    cp_async_wait_all();
    __syncthreads();  // K tile landed; every warp is done with the previous V tile
    float scores[kScoreTiles][4];  // [16, BLOCK_N] per warp
    if (active) {
      v_tile.template load_async<Cfg::kThreads>(v, j0, seq.kv_len, tid);
      cp_async_commit();
      zero(scores);
      warp_gemm_a_bt<Element, kScoreTiles, E>(scores, q_tile, warp * 16, k_tile, lane);
    }
    cp_async_wait_all();
    __syncthreads();  // V tile landed; every warp is done with the K tile
    if (n_block + 1 < n_end) {
      k_tile.template load_async<Cfg::kThreads>(k, j0 + BN, seq.kv_len, tid);
      cp_async_commit();
    }
    if (!active) continue;

    const bool plain = mod.tile_is_plain(i0, i0 + BM - 1, j0, j0 + BN - 1);
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + n * 8 + 2 * t + (e & 1);
        scores[n][e] = plain ? scores[n][e] * mod.scale
                             : mod.score<Element>(scores[n][e], rows[e / 2], j, nullptr);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(scores[n][2 * r], scores[n][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(tile_max));
      // A row that has seen only -inf keeps max -inf; exponentiate against 0 so exp(-inf) = 0.
      const float max_used = new_max == -INFINITY ? 0.0f : new_max;
      const float rescale = exp2f((row_max[r] - max_used) * kLog2e);
      row_max[r] = new_max;
      row_sum[r] *= rescale;
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        out_acc[n][2 * r] *= rescale;
        out_acc[n][2 * r + 1] *= rescale;
      }
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float prob = exp2f((scores[n][2 * r + c] - max_used) * kLog2e);
          row_sum[r] += prob;
          scores[n][2 * r + c] = prob;
        }
      }
    }
    if (p.dropout_p > 0.0f) {
      // The LSE (row_sum) is of the kept-and-dropped probabilities; only P V sees dropout.
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = rows[e / 2];
        if (i >= seq.q_len) continue;
        const int64_t row_base = (lse_row0 + i) * p.kv_len;
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n) {
          const int64_t j = j0 + n * 8 + 2 * t + (e & 1);
          if (j < seq.kv_len) scores[n][e] *= dropout_factor(p, row_base, j);
        }
      }
    }
    warp_gemm_p_b<Element, kOutTiles, BN>(out_acc, scores, v_tile, lane);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = rows[r];
    const float sum = quad_sum(row_sum[r]);
    // sum is 0 only for a row with no visible key: output 0. A NaN score (from q, k or v) makes
    // sum NaN (fmaxf drops NaN from the max, exp2f does not), and the row and its lse NaN.
    const float inv_sum = sum == 0.0f ? 0.0f : 1.0f / sum;
    const float lse = sum == 0.0f ? -INFINITY : row_max[r] + logf(sum);
    if (i >= seq.q_len) continue;
    const int64_t row_index = lse_row0 + i;
    if (p.num_splits == 1) {
      Element* out = static_cast<Element*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                     (seq.q_start + i) * p.out_stride[2];
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        *reinterpret_cast<uint32_t*>(out + n * 8 + 2 * t) = ElementTraits<Element>::pack(
            out_acc[n][2 * r] * inv_sum, out_acc[n][2 * r + 1] * inv_sum);
      }
      if (t == 0) p.lse[row_index] = lse;
    } else {  // [B, Hq, L] rows (the glue never splits varlen problems)
      const int64_t partial_row = int64_t{split} * p.batch * p.q_heads * p.q_len + row_index;
      float* out = p.out_partial + partial_row * E;
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        *reinterpret_cast<float2*>(out + n * 8 + 2 * t) =
            make_float2(out_acc[n][2 * r] * inv_sum, out_acc[n][2 * r + 1] * inv_sum);
      }
      if (t == 0) p.lse_partial[partial_row] = lse;
    }
  }
}

// Merges the num_splits partial rows of each (b, h, i) by their LSE. One warp per row.
template <typename Element, int HEAD_DIM>
__global__ void __launch_bounds__(128) attention_split_combine_kernel(const AttentionParams p) {
  constexpr int kPerLane = (HEAD_DIM + kWarpSize - 1) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t rows_total = p.batch * p.q_heads * p.q_len;
  const int64_t row = int64_t{blockIdx.x} * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows_total) return;
  const int64_t i = row % p.q_len;
  const int64_t bh = row / p.q_len;
  const int64_t b = bh / p.q_heads, h = bh % p.q_heads;

  // The max keeps a NaN lse (fmaxf would drop it, and a row whose splits are all NaN would
  // come out 0).
  float lse_max = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) {
    const float part = p.lse_partial[s * rows_total + row];
    lse_max = isnan(part) || part > lse_max ? part : lse_max;
  }
  float acc[kPerLane] = {};
  float weight_sum = 0.0f;
  if (lse_max != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float weight = expf(p.lse_partial[s * rows_total + row] - lse_max);  // 0 for an empty split
      weight_sum += weight;
      const float* part = p.out_partial + (s * rows_total + row) * HEAD_DIM;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + c * kWarpSize;
        if (e < HEAD_DIM) acc[c] += weight * part[e];
      }
    }
  }
  const float inv = weight_sum == 0.0f ? 0.0f : 1.0f / weight_sum;
  Element* out = static_cast<Element*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                 i * p.out_stride[2];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int e = lane + c * kWarpSize;
    if (e < HEAD_DIM) out[e] = ElementTraits<Element>::from_float(acc[c] * inv);
  }
  if (lane == 0) p.lse[row] = weight_sum == 0.0f ? -INFINITY : lse_max + logf(weight_sum);
}

template <typename Cfg>
cudaError_t launch_fwd_kernel(const AttentionParams& p, cudaStream_t stream) {
  const auto kernel = attention_fwd_kernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.q_len, Cfg::kBlockM), p.q_heads, p.batch * p.num_splits);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int HEAD_DIM>
cudaError_t launch_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (p.num_splits == 1) {
    return p.q_len <= kDecodeMaxLenQ ? launch_fwd_kernel<FwdDecodeConfig<Element, HEAD_DIM>>(p, stream)
                                     : launch_fwd_kernel<FwdMainConfig<Element, HEAD_DIM>>(p, stream);
  }
  if (p.q_len > kDecodeMaxLenQ || p.num_splits > kMaxSplits || !p.out_partial || !p.lse_partial ||
      p.cu_seqlens_q != nullptr) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = launch_fwd_kernel<FwdDecodeConfig<Element, HEAD_DIM>>(p, stream);
  if (err != cudaSuccess) return err;
  constexpr int kRowsPerBlock = 4;
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  attention_split_combine_kernel<Element, HEAD_DIM>
      <<<ceil_div(rows, kRowsPerBlock), kRowsPerBlock * kWarpSize, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attn
}  // namespace fastattn
