// FlashAttention-2-style backward on tensor cores (sm_80+), deterministic (no atomics):
//   1. preprocess: delta = rowsum(dO * O)                                  [B, Hq, L] fp32
//   2. dK / dV: one CTA per key tile and kv head; it loops over the query heads sharing that
//      kv head (GQA, summed in registers) and their query tiles, recomputing P from the LSE.
//   3. dQ: one CTA per query tile and head; it loops over key tiles, recomputing P and dS.
// Both 2 and 3 recompute Q K^T and dO V^T instead of accumulating dQ with atomics: more
// FLOPs, but bitwise reproducible and free of an fp32 dQ workspace. Varlen problems run the
// same kernels (Sequence: each CTA finds its sequence's rows; CTAs past its end exit).
// With s = score(z), z = q.k, P = exp(s - lse), dP = dO v (times the dropout factor):
//   dS = P (dP - delta) (= dmask), dZ = dS * ds/dz, dQ = dZ K, dK = dZ^T Q, dV = P_dropped^T dO.
#pragma once

#include "attention_common.cuh"
#include "attention_launch.h"

namespace fastattn {
namespace attn {

// Rows of lse / delta: [B, Hq, L], or varlen [Hq, total_q] (one batch of total_q rows).
__host__ __device__ inline int64_t lse_batches(const AttentionParams& p) { return p.cu_seqlens_q ? 1 : p.batch; }
__host__ __device__ inline int64_t lse_rows_per_head(const AttentionParams& p) {
  return p.cu_seqlens_q ? p.total_q : p.q_len;
}

// delta[b, h, i] = sum_e dO[b, h, i, e] * O[b, h, i, e]. One warp per row.
template <typename Element, int HEAD_DIM>
__global__ void __launch_bounds__(128) attention_bwd_preprocess_kernel(const AttentionBwdParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t rows_per_head = lse_rows_per_head(p);
  const int64_t rows_total = lse_batches(p) * p.q_heads * rows_per_head;
  const int64_t row = int64_t{blockIdx.x} * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows_total) return;
  const int64_t i = row % rows_per_head;  // varlen: the packed row (batch strides are 0)
  const int64_t bh = row / rows_per_head;
  const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
  const Element* d_out = static_cast<const Element*>(p.grad_out) + b * p.grad_out_stride[0] +
                         h * p.grad_out_stride[1] + i * p.grad_out_stride[2];
  const Element* out = static_cast<const Element*>(p.out) + b * p.out_stride[0] +
                       h * p.out_stride[1] + i * p.out_stride[2];
  float sum = 0.0f;
  for (int e = lane; e < HEAD_DIM; e += kWarpSize) {
    sum += ElementTraits<Element>::to_float(d_out[e]) * ElementTraits<Element>::to_float(out[e]);
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = sum;
}

// The LSE a backward kernel subtracts: +inf for rows past L and rows without a visible key,
// so that their P = exp(s - lse) is exactly 0 (never exp(-inf + inf) = NaN).
__device__ __forceinline__ float lse_for_backward(const float* lse, int64_t i, int64_t q_len) {
  const float value = i < q_len ? lse[i] : INFINITY;
  return value == -INFINITY ? INFINITY : value;
}

template <typename Element_, int HEAD_DIM, int NUM_WARPS, int BLOCK_N>
struct BwdDqConfig {
  using Element = Element_;
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kThreads = NUM_WARPS * kWarpSize;
  static constexpr int kBlockM = 16 * NUM_WARPS;  // queries: one 16-row mma tile per warp
  static constexpr int kBlockN = BLOCK_N;          // keys per step
  using QTile = SmemTile<Element, kBlockM, HEAD_DIM>;  // q and dO: [BLOCK_M, E]
  using KVTile = SmemTile<Element, kBlockN, HEAD_DIM>;  // k and v: [BLOCK_N, E]
  static constexpr int kSmemBytes = 2 * QTile::kBytes + 2 * KVTile::kBytes;
  static_assert(kBlockN % 16 == 0, "keys are the k dim of dS K: multiples of 16");
  static_assert(kSmemBytes <= 227 * 1024, "tiles must fit in shared memory");
};

template <typename Element, int HEAD_DIM>
using BwdDqMainConfig = BwdDqConfig<Element, HEAD_DIM, 4, (HEAD_DIM <= 128 ? 64 : 32)>;

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_dq_kernel(const AttentionBwdParams p) {
  using Element = typename Cfg::Element;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, E = Cfg::kHeadDim;
  constexpr int kScoreTiles = BN / 8, kOutTiles = E / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const typename Cfg::QTile q_tile{reinterpret_cast<Element*>(smem)};
  const typename Cfg::QTile do_tile{q_tile.data + Cfg::QTile::kElements};
  const typename Cfg::KVTile k_tile{do_tile.data + Cfg::QTile::kElements};
  const typename Cfg::KVTile v_tile{k_tile.data + Cfg::KVTile::kElements};

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / query_heads_per_kv_head(p);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const Sequence seq(p, b);
  if (i0 >= seq.q_len) return;  // the grid covers the longest sequence

  const auto q = seq.q_rows<Element>(p.q, b, h, p.q_stride[0], p.q_stride[1], p.q_stride[2]);
  const auto d_out = seq.q_rows<Element>(p.grad_out, b, h, p.grad_out_stride[0], p.grad_out_stride[1],
                                         p.grad_out_stride[2]);
  const auto k = seq.kv_rows<Element>(p.k, hk, p.k_stride[0], p.k_stride[1], p.k_stride[2]);
  const auto v = seq.kv_rows<Element>(p.v, hk, p.v_stride[0], p.v_stride[1], p.v_stride[2]);
  const int64_t bh_rows = seq.lse_row0(p, b, h);  // lse / delta index of (b, h, 0)
  const ScoreMod mod(p, seq, b, h, sizeof(Element));

  int64_t j_begin, j_end;
  mod.key_range(i0, i0 + BM - 1, j_begin, j_end);
  const int n_begin = static_cast<int>(j_begin / BN);
  const int n_end = j_end > j_begin ? static_cast<int>((j_end + BN - 1) / BN) : n_begin;

  const int64_t rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse[r] = lse_for_backward(p.lse + bh_rows, rows[r], seq.q_len);
    delta[r] = rows[r] < seq.q_len ? p.delta[bh_rows + rows[r]] : 0.0f;
  }
  float dq_acc[kOutTiles][4];  // [16, E] per warp
  zero(dq_acc);

  if (n_begin < n_end) {
    q_tile.template load_async<Cfg::kThreads>(q, i0, seq.q_len, tid);
    do_tile.template load_async<Cfg::kThreads>(d_out, i0, seq.q_len, tid);
    k_tile.template load_async<Cfg::kThreads>(k, int64_t{n_begin} * BN, seq.kv_len, tid);
    cp_async_commit();
  }
  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    const int64_t j0 = int64_t{n_block} * BN;
    const bool active = mod.tile_has_visible<Element, BM, BN, Cfg::kThreads>(i0, j0, tid);
    cp_async_wait_all();
    __syncthreads();  // Q, dO and this K tile landed
    float scores[kScoreTiles][4];  // [16, BLOCK_N] per warp: z, then P, then dZ
    if (active) {
      v_tile.template load_async<Cfg::kThreads>(v, j0, seq.kv_len, tid);
      cp_async_commit();
      zero(scores);
      warp_gemm_a_bt<Element, kScoreTiles, E>(scores, q_tile, warp * 16, k_tile, lane);
    }
    cp_async_wait_all();
    __syncthreads();  // V tile landed
    if (active) {
      float d_probs[kScoreTiles][4];  // [16, BLOCK_N] per warp: dO V^T
      zero(d_probs);
      warp_gemm_a_bt<Element, kScoreTiles, E>(d_probs, do_tile, warp * 16, v_tile, lane);
      const bool plain = mod.tile_is_plain(i0, i0 + BM - 1, j0, j0 + BN - 1);
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          const int64_t i = rows[r], j = j0 + n * 8 + 2 * t + (e & 1);
          float ds_dz = mod.scale;
          const float s = plain ? scores[n][e] * mod.scale : mod.score<Element>(scores[n][e], i, j, &ds_dz);
          const float prob = exp2f((s - lse[r]) * kLog2e);
          const bool in_bounds = i < seq.q_len && j < seq.kv_len;
          float d_prob = d_probs[n][e];
          if (p.dropout_p > 0.0f && in_bounds) d_prob *= dropout_factor(p, (bh_rows + i) * p.kv_len, j);
          const float d_score = prob * (d_prob - delta[r]);
          if (p.dmask != nullptr && in_bounds) static_cast<float*>(p.dmask)[(bh_rows + i) * p.kv_len + j] = d_score;
          scores[n][e] = d_score * ds_dz;
        }
      }
      warp_gemm_p_b<Element, kOutTiles, BN>(dq_acc, scores, k_tile, lane);
    }
    __syncthreads();  // every warp is done with the K and V tiles
    if (n_block + 1 < n_end) {
      k_tile.template load_async<Cfg::kThreads>(k, j0 + BN, seq.kv_len, tid);
      cp_async_commit();
    }
  }

  const auto dq = seq.q_rows<Element>(p.dq, b, h, p.dq_stride[0], p.dq_stride[1], p.dq_stride[2]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= seq.q_len) continue;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      *reinterpret_cast<uint32_t*>(const_cast<Element*>(dq.row(rows[r])) + n * 8 + 2 * t) =
          ElementTraits<Element>::pack(dq_acc[n][2 * r], dq_acc[n][2 * r + 1]);
    }
  }
}

template <typename Element_, int HEAD_DIM, int NUM_WARPS, int BLOCK_M, bool COMPUTE_DK, bool COMPUTE_DV>
struct BwdDkDvConfig {
  using Element = Element_;
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kThreads = NUM_WARPS * kWarpSize;
  static constexpr int kBlockN = 16 * NUM_WARPS;  // keys: one 16-row mma tile per warp
  static constexpr int kBlockM = BLOCK_M;          // queries per step
  static constexpr bool kComputeDk = COMPUTE_DK;
  static constexpr bool kComputeDv = COMPUTE_DV;
  using KVTile = SmemTile<Element, kBlockN, HEAD_DIM>;  // k and v: [BLOCK_N, E]
  using QTile = SmemTile<Element, kBlockM, HEAD_DIM>;   // q and dO: [BLOCK_M, E]
  static constexpr int kSmemBytes = 2 * KVTile::kBytes + 2 * QTile::kBytes + 2 * kBlockM * 4;
  static_assert(kBlockM % 16 == 0, "queries are the k dim of P^T dO: multiples of 16");
  static_assert(COMPUTE_DK || COMPUTE_DV, "a dK/dV kernel computes at least one of them");
  static_assert(kSmemBytes <= 227 * 1024, "tiles must fit in shared memory");
};

// Up to E = 128 one kernel accumulates dK and dV together (E floats per thread); the wider
// heads run it twice, once per gradient, so that the accumulators stay in registers. The
// query step shrinks as the accumulators grow (ptxas: 0 spills at E = 64, 128; see
// benchmarks/results/ptxas/ptxas_report.txt).
template <int HEAD_DIM>
constexpr int kDkDvBlockM = HEAD_DIM <= 64 ? 64 : (HEAD_DIM <= 96 ? 32 : 16);
template <typename Element, int HEAD_DIM, bool COMPUTE_DK, bool COMPUTE_DV>
using BwdDkDvMainConfig = BwdDkDvConfig<Element, HEAD_DIM, 4, kDkDvBlockM<HEAD_DIM>, COMPUTE_DK, COMPUTE_DV>;
template <int HEAD_DIM>
constexpr bool kSplitDkDv = HEAD_DIM > 128;

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  using Element = typename Cfg::Element;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, E = Cfg::kHeadDim;
  constexpr int kScoreTiles = BM / 8, kOutTiles = E / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const typename Cfg::KVTile k_tile{reinterpret_cast<Element*>(smem)};
  const typename Cfg::KVTile v_tile{k_tile.data + Cfg::KVTile::kElements};
  const typename Cfg::QTile q_tile{v_tile.data + Cfg::KVTile::kElements};
  const typename Cfg::QTile do_tile{q_tile.data + Cfg::QTile::kElements};
  float* lse_s = reinterpret_cast<float*>(do_tile.data + Cfg::QTile::kElements);  // [BLOCK_M]
  float* delta_s = lse_s + BM;                                                   // [BLOCK_M]

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = query_heads_per_kv_head(p);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const Sequence seq(p, b);
  if (j0 >= seq.kv_len) return;  // the grid covers the longest sequence
  const auto k = seq.kv_rows<Element>(p.k, hk, p.k_stride[0], p.k_stride[1], p.k_stride[2]);
  const auto v = seq.kv_rows<Element>(p.v, hk, p.v_stride[0], p.v_stride[1], p.v_stride[2]);

  k_tile.template load_async<Cfg::kThreads>(k, j0, seq.kv_len, tid);
  if constexpr (Cfg::kComputeDk) v_tile.template load_async<Cfg::kThreads>(v, j0, seq.kv_len, tid);
  cp_async_commit();

  const int64_t keys[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  float dk_acc[Cfg::kComputeDk ? kOutTiles : 2][4];  // [16, E] per warp
  float dv_acc[Cfg::kComputeDv ? kOutTiles : 2][4];  // [16, E] per warp
  zero(dk_acc);
  zero(dv_acc);

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const ScoreMod mod(p, seq, b, h, sizeof(Element));
    const auto q = seq.q_rows<Element>(p.q, b, h, p.q_stride[0], p.q_stride[1], p.q_stride[2]);
    const auto d_out = seq.q_rows<Element>(p.grad_out, b, h, p.grad_out_stride[0], p.grad_out_stride[1],
                                           p.grad_out_stride[2]);
    const int64_t bh_rows = seq.lse_row0(p, b, h);
    int64_t i_begin, i_end;
    mod.query_range(j0, j0 + BN - 1, i_begin, i_end);
    const int m_begin = static_cast<int>(i_begin / BM);
    const int m_end = i_end > i_begin ? static_cast<int>((i_end + BM - 1) / BM) : m_begin;

    for (int m_block = m_begin; m_block < m_end; ++m_block) {
      const int64_t i0 = int64_t{m_block} * BM;
      if (!mod.tile_has_visible<Element, BM, BN, Cfg::kThreads>(i0, j0, tid)) continue;
      __syncthreads();  // every warp is done with the previous Q, dO, lse and delta
      q_tile.template load_async<Cfg::kThreads>(q, i0, seq.q_len, tid);
      cp_async_commit();
      do_tile.template load_async<Cfg::kThreads>(d_out, i0, seq.q_len, tid);
      cp_async_commit();
      for (int c = tid; c < BM; c += Cfg::kThreads) {
        lse_s[c] = lse_for_backward(p.lse + bh_rows, i0 + c, seq.q_len);
        delta_s[c] = i0 + c < seq.q_len ? p.delta[bh_rows + i0 + c] : 0.0f;
      }
      cp_async_wait<1>();
      __syncthreads();  // Q (and K, V on the first step), lse and delta are in shared memory

      float probs[kScoreTiles][4];  // [16 keys, BLOCK_M queries] per warp: z, then P (dropped)
      zero(probs);
      warp_gemm_a_bt<Element, kScoreTiles, E>(probs, k_tile, warp * 16, q_tile, lane);
      cp_async_wait<0>();
      __syncthreads();  // dO landed

      float d_scores[Cfg::kComputeDk ? kScoreTiles : 2][4];  // dP^T = V dO^T, then dZ^T
      zero(d_scores);
      if constexpr (Cfg::kComputeDk) {
        warp_gemm_a_bt<Element, kScoreTiles, E>(d_scores, v_tile, warp * 16, do_tile, lane);
      }
      const bool plain = mod.tile_is_plain(i0, i0 + BM - 1, j0, j0 + BN - 1);
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * t + (e & 1);
          const int64_t i = i0 + c, j = keys[e / 2];
          float ds_dz = mod.scale;
          const float s = plain ? probs[n][e] * mod.scale : mod.score<Element>(probs[n][e], i, j, &ds_dz);
          const float prob = exp2f((s - lse_s[c]) * kLog2e);
          const float keep = p.dropout_p > 0.0f && i < seq.q_len && j < seq.kv_len
                                 ? dropout_factor(p, (bh_rows + i) * p.kv_len, j)
                                 : 1.0f;
          if constexpr (Cfg::kComputeDk) {
            d_scores[n][e] = prob * (d_scores[n][e] * keep - delta_s[c]) * ds_dz;
          }
          probs[n][e] = prob * keep;
        }
      }
      if constexpr (Cfg::kComputeDv) warp_gemm_p_b<Element, kOutTiles, BM>(dv_acc, probs, do_tile, lane);
      if constexpr (Cfg::kComputeDk) warp_gemm_p_b<Element, kOutTiles, BM>(dk_acc, d_scores, q_tile, lane);
    }
  }
  cp_async_wait_all();  // K / V of a CTA that visited no query tile

  const auto dk = seq.kv_rows<Element>(p.dk, hk, p.dk_stride[0], p.dk_stride[1], p.dk_stride[2]);
  const auto dv = seq.kv_rows<Element>(p.dv, hk, p.dv_stride[0], p.dv_stride[1], p.dv_stride[2]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= seq.kv_len) continue;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      if constexpr (Cfg::kComputeDk) {
        *reinterpret_cast<uint32_t*>(const_cast<Element*>(dk.row(keys[r])) + n * 8 + 2 * t) =
            ElementTraits<Element>::pack(dk_acc[n][2 * r], dk_acc[n][2 * r + 1]);
      }
      if constexpr (Cfg::kComputeDv) {
        *reinterpret_cast<uint32_t*>(const_cast<Element*>(dv.row(keys[r])) + n * 8 + 2 * t) =
            ElementTraits<Element>::pack(dv_acc[n][2 * r], dv_acc[n][2 * r + 1]);
      }
    }
  }
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename Cfg>
cudaError_t launch_dkdv_kernel(const AttentionBwdParams& p, cudaStream_t stream) {
  const auto kernel = attention_bwd_dkdv_kernel<Cfg>;
  cudaError_t err = allow_smem(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.kv_len, Cfg::kBlockN), p.kv_heads, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int HEAD_DIM>
cudaError_t launch_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 4;
  const int64_t rows = lse_batches(p) * p.q_heads * lse_rows_per_head(p);
  attention_bwd_preprocess_kernel<Element, HEAD_DIM>
      <<<ceil_div(rows, kRowsPerBlock), kRowsPerBlock * kWarpSize, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  using DqCfg = BwdDqMainConfig<Element, HEAD_DIM>;
  const auto dq_kernel = attention_bwd_dq_kernel<DqCfg>;
  err = allow_smem(dq_kernel, DqCfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  dq_kernel<<<dim3(ceil_div(p.q_len, DqCfg::kBlockM), p.q_heads, p.batch), DqCfg::kThreads, DqCfg::kSmemBytes,
              stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  if constexpr (kSplitDkDv<HEAD_DIM>) {
    err = launch_dkdv_kernel<BwdDkDvMainConfig<Element, HEAD_DIM, true, false>>(p, stream);
    if (err != cudaSuccess) return err;
    return launch_dkdv_kernel<BwdDkDvMainConfig<Element, HEAD_DIM, false, true>>(p, stream);
  } else {
    return launch_dkdv_kernel<BwdDkDvMainConfig<Element, HEAD_DIM, true, true>>(p, stream);
  }
}

}  // namespace attn
}  // namespace fastattn
