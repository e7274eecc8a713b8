// Building blocks shared by the CUDA attention kernels: tensor-core fragments (mma.sync
// m16n8k16, ldmatrix, cp.async via inline PTX, sm_80+), shared-memory tiles, and the score
// modifiers (scale, softcap, alibi, mask, visibility window) with their tile-skipping tests.
// Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fastattn/attention_params.h"
#include "fastattn/philox.h"

namespace fastattn {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpSize = 32;

// ---- element types -------------------------------------------------------------------------

template <typename Element>
struct ElementTraits;

template <>
struct ElementTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static constexpr uint32_t kNaNPair = 0x7E007E00u;  // two quiet NaNs
};

template <>
struct ElementTraits<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static constexpr uint32_t kNaNPair = 0x7FC07FC0u;  // two quiet NaNs
};

// ---- tensor-core primitives ------------------------------------------------------------------

// d[4] += a[4] (16x16, row major) * b[2] (16x8, column major); fp32 accumulators.
// Fragment layouts (PTX ISA, mma.m16n8k16): with g = lane / 4, t = lane % 4,
//   a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}   b: {(2t..2t+1, g), (2t+8.., g)}
//   d: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}
template <typename Element>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  if constexpr (std::is_same_v<Element, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<Element, __nv_bfloat16>, "attention kernels take fp16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (rows past the end of a tensor).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem_dst)),
               "l"(global_src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Waits until at most PENDING of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- shared-memory tiles ---------------------------------------------------------------------

// A [ROWS, HEAD_DIM] tile in shared memory with rows padded by 16 bytes: a row is then
// (HEAD_DIM / 8 + 1) 16-byte chunks, an odd number, so the 8 row addresses of one ldmatrix
// fall into 8 different bank groups (no conflicts, no swizzle needed for any head dim).
template <typename Element, int ROWS, int HEAD_DIM>
struct SmemTile {
  static_assert(HEAD_DIM % 16 == 0, "head dim must be a multiple of 16 (mma k step)");
  static_assert(((HEAD_DIM / 8 + 1) % 2) == 1, "padded row must be an odd number of 16-byte chunks");
  static constexpr int kStride = HEAD_DIM + 8;  // elements
  static constexpr int kElements = ROWS * kStride;
  static constexpr int kBytes = kElements * static_cast<int>(sizeof(Element));
  static_assert(kBytes % 16 == 0, "tiles must keep 16-byte alignment of the next tile");

  Element* data;

  __device__ __forceinline__ Element* at(int row, int col) const { return data + row * kStride + col; }

  // Rows [row0, row0 + ROWS) of a [rows_total, HEAD_DIM] global matrix (`rows`: a Rows);
  // rows past rows_total are zero-filled (zeros, not garbage: 0 * NaN would poison P @ V), the
  // rows of a block outside the cache (Rows::row is null) are filled with rows.missing_fill.
  template <int NUM_THREADS, typename RowsOfMatrix>
  __device__ __forceinline__ void load_async(const RowsOfMatrix& rows, int64_t row0, int64_t rows_total,
                                             int tid) const {
    constexpr int kChunksPerRow = HEAD_DIM / 8;
    constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
    for (int c = tid; c < kChunks; c += NUM_THREADS) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const bool in_bounds = row0 + row < rows_total;
      const Element* src = in_bounds ? rows.row(row0 + row) : rows.base;
      if (src == nullptr) {
        const uint32_t f = rows.missing_fill;
        *reinterpret_cast<uint4*>(at(row, col)) = uint4{f, f, f, f};
        continue;
      }
      cp_async_16(at(row, col), in_bounds ? src + col : src, in_bounds ? 16 : 0);
    }
  }
};

// The rows of one (sequence, head) matrix in global memory: `row_stride` apart, or, paged,
// row r at row r % block_size of block blocks[r / block_size], blocks `block_stride` apart.
// The branch on `blocks` is uniform, so the dense layouts pay one predictable test.
// A block id outside [0, num_blocks) (a wrong block_table / cache_batch_idx value: the glue
// cannot check values without a host sync) is never dereferenced: row() is null, and the tile
// loader writes missing_fill (two elements' bits) instead.
template <typename Element>
struct Rows {
  const Element* base;  // row 0 (paged: of block 0)
  int64_t row_stride;
  const int* blocks = nullptr;
  int block_size = 1;
  int64_t block_stride = 0;
  int64_t num_blocks = 0;
  uint32_t missing_fill = 0;

  __device__ __forceinline__ const Element* row(int64_t r) const {
    if (blocks == nullptr) return base + r * row_stride;
    const int64_t block = blocks[r / block_size];
    if (block < 0 || block >= num_blocks) return nullptr;
    return base + block * block_stride + (r % block_size) * row_stride;
  }
};

// Query heads per kv head (GQA), divided in 32 bits: the glue bounds the head counts by 65535
// (grid.y), and a 64-bit division is a long software routine on the GPU.
__device__ __forceinline__ int query_heads_per_kv_head(const AttentionParams& p) {
  return static_cast<int>(p.q_heads) / static_cast<int>(p.kv_heads);
}

// What the tile loader writes for the rows of a block outside the cache: NaN keys (a query
// that sees one gets a NaN score, so a NaN row, as for NaN inputs), zero values (a query that
// does not see them multiplies them by 0).
enum class MissingRows { kZero, kNaN };

// Where sequence b of the batch lives and how long it is, in each layout of AttentionParams
// (dense, varlen, KV cache).
struct Sequence {
  int64_t q_len, kv_len;  // this sequence's queries and keys
  int64_t q_start;        // its first row in q / out / dq (varlen; else 0)
  int64_t k_start;        // its first row in k / v / dk / dv (varlen; else 0)
  int64_t kv_batch;       // its batch index in k / v (b; a KV cache's row is in blocks)
  // KV cache with a block table: its row of the table. With cache_batch_idx: its entry, the id
  // of one block of kv_len (S_max) rows, so that both index paths share Rows' bound check.
  const int* blocks;
  int block_size;
  int64_t num_blocks;  // the bound of the block ids

  __device__ Sequence(const AttentionParams& p, int b) {
    q_len = p.q_len, kv_len = p.kv_len, q_start = 0, k_start = 0, kv_batch = b, blocks = nullptr;
    block_size = 1, num_blocks = p.cache_blocks;
    if (p.cu_seqlens_q != nullptr) {
      q_start = p.cu_seqlens_q[b], k_start = p.cu_seqlens_k[b];
      q_len = p.cu_seqlens_q[b + 1] - q_start;
      kv_len = p.cu_seqlens_k[b + 1] - k_start;
    }
    if (p.cache_seqlens != nullptr) {
      const int64_t keys = p.cache_seqlens[b] + p.kv_new_len;
      kv_len = keys < p.kv_len ? keys : p.kv_len;  // never past the cache's capacity
      if (p.block_table != nullptr) {
        blocks = p.block_table + b * p.block_table_stride, block_size = static_cast<int>(p.block_size);
      } else if (p.cache_batch_idx != nullptr) {
        blocks = p.cache_batch_idx + b, block_size = static_cast<int>(p.kv_len);
      }
    }
  }

  // The index in lse / delta of query row 0 of head h: [B, Hq, L] dense, [Hq, total_q] varlen.
  __device__ __forceinline__ int64_t lse_row0(const AttentionParams& p, int b, int h) const {
    return p.cu_seqlens_q != nullptr ? int64_t{h} * p.total_q + q_start
                                     : (int64_t{b} * p.q_heads + h) * p.q_len;
  }

  // Query rows of head h in q-like tensors (q, out, grad_out, dq), given their strides. The
  // strides come as values, not as the params' arrays: a reference into the kernel's
  // parameter costs the forward kernel registers (ptxas: 178 -> 184 for fp16 E64).
  template <typename Element>
  __device__ __forceinline__ Rows<Element> q_rows(const void* base, int b, int h, int64_t batch_stride,
                                                  int64_t head_stride, int64_t row_stride) const {
    return {static_cast<const Element*>(base) + b * batch_stride + q_start * row_stride + h * head_stride,
            row_stride};
  }

  // Key rows of kv head hk in k, v (paged through the block table) or dk, dv.
  template <typename Element>
  __device__ __forceinline__ Rows<Element> kv_rows(const void* base, int hk, int64_t batch_stride,
                                                   int64_t head_stride, int64_t row_stride,
                                                   MissingRows missing = MissingRows::kZero) const {
    const Element* head = static_cast<const Element*>(base) + hk * head_stride;
    if (blocks != nullptr) {
      const uint32_t fill = missing == MissingRows::kNaN ? ElementTraits<Element>::kNaNPair : 0u;
      return {head, row_stride, blocks, block_size, batch_stride, num_blocks, fill};
    }
    return {head + kv_batch * batch_stride + k_start * row_stride, row_stride};
  }
};

// A fragment (16 rows x 16 cols at (row0, col0)) of a row-major tile.
template <typename Tile>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const Tile& tile, int row0, int col0,
                                                int lane) {
  ldmatrix_x4(a, tile.at(row0 + (lane % 16), col0 + (lane / 16) * 8));
}

// B fragments of two adjacent n-tiles (n0..n0+15) x 16 k (k0..k0+15) from a tile stored
// [n][k] (keys x head dim for Q K^T): {b0, b1} of n-tile n0 in r[0], r[1]; of n0+8 in r[2], r[3].
template <typename Tile>
__device__ __forceinline__ void load_b_fragments_nk(uint32_t (&r)[4], const Tile& tile, int n0, int k0,
                                                    int lane) {
  ldmatrix_x4(r, tile.at(n0 + (lane % 8) + (lane / 16) * 8, k0 + ((lane / 8) % 2) * 8));
}

// The same from a tile stored [k][n] (keys x head dim for P V), through ldmatrix.trans.
template <typename Tile>
__device__ __forceinline__ void load_b_fragments_kn(uint32_t (&r)[4], const Tile& tile, int k0, int n0,
                                                    int lane) {
  ldmatrix_x4_trans(r, tile.at(k0 + (lane % 8) + ((lane / 8) % 2) * 8, n0 + (lane / 16) * 8));
}

// acc[N_TILES][4] (+)= A (16 x K_DIM, a tile's rows row0..row0+15) * B^T where B is a tile
// stored [n][k] (n = N_TILES * 8 rows from n0). One warp.
template <typename Element, int N_TILES, int K_DIM, typename TileA, typename TileB>
__device__ __forceinline__ void warp_gemm_a_bt(float (&acc)[N_TILES][4], const TileA& a_tile, int row0,
                                               const TileB& b_tile, int lane) {
  static_assert(N_TILES % 2 == 0 && K_DIM % 16 == 0, "warp gemm tiles are 16 x 16 steps");
#pragma unroll
  for (int k = 0; k < K_DIM; k += 16) {
    uint32_t a[4];
    load_a_fragment(a, a_tile, row0, k, lane);
#pragma unroll
    for (int n = 0; n < N_TILES; n += 2) {
      uint32_t b[4];
      load_b_fragments_nk(b, b_tile, n * 8, k, lane);
      mma_16x8x16<Element>(acc[n], a, b[0], b[1]);
      mma_16x8x16<Element>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// acc[N_TILES][4] += P (16 x K_DIM, fp32 accumulators in mma d-layout, K_DIM / 8 n-tiles,
// rounded to Element) * B where B is a tile stored [k][n]. One warp.
template <typename Element, int N_TILES, int K_DIM, typename TileB>
__device__ __forceinline__ void warp_gemm_p_b(float (&acc)[N_TILES][4], const float (&p)[K_DIM / 8][4],
                                              const TileB& b_tile, int lane) {
  static_assert(N_TILES % 2 == 0 && K_DIM % 16 == 0, "warp gemm tiles are 16 x 16 steps");
#pragma unroll
  for (int k = 0; k < K_DIM / 16; ++k) {
    // The d-layout of two adjacent n-tiles is the a-layout of one 16-wide k step.
    const uint32_t a[4] = {ElementTraits<Element>::pack(p[2 * k][0], p[2 * k][1]),
                           ElementTraits<Element>::pack(p[2 * k][2], p[2 * k][3]),
                           ElementTraits<Element>::pack(p[2 * k + 1][0], p[2 * k + 1][1]),
                           ElementTraits<Element>::pack(p[2 * k + 1][2], p[2 * k + 1][3])};
#pragma unroll
    for (int n = 0; n < N_TILES; n += 2) {
      uint32_t b[4];
      load_b_fragments_kn(b, b_tile, k * 16, n * 8, lane);
      mma_16x8x16<Element>(acc[n], a, b[0], b[1]);
      mma_16x8x16<Element>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

template <int N_TILES>
__device__ __forceinline__ void zero(float (&acc)[N_TILES][4]) {
#pragma unroll
  for (int n = 0; n < N_TILES; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// ---- score modifiers -------------------------------------------------------------------------

// Everything that turns q.k into the score of (query i, key j) for one (batch, query head),
// in the contract's order: scale, softcap, alibi, mask, visibility.
struct ScoreMod {
  float scale, softcap, slope;
  bool has_alibi, has_mask, mask_is_bool, mask_is_float32;
  const unsigned char* mask;  // at (b, h); bytes, element size below
  int mask_element_bytes;
  int64_t mask_row_stride, mask_col_stride;
  int64_t q_len, kv_len, offset, window_left, window_right;

  __device__ ScoreMod(const AttentionParams& p, const Sequence& seq, int b, int h, int element_bytes) {
    scale = static_cast<float>(p.scale);
    softcap = static_cast<float>(p.softcap);
    has_alibi = p.alibi_slopes != nullptr;
    slope = has_alibi ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
    has_mask = p.mask != nullptr;
    mask_is_bool = p.mask_kind == AttnMaskKind::Bool;
    mask_is_float32 = p.mask_is_float32;
    mask_element_bytes = mask_is_bool ? 1 : (mask_is_float32 ? 4 : element_bytes);
    mask = static_cast<const unsigned char*>(p.mask) +
           (b * p.mask_stride[0] + h * p.mask_stride[1]) * mask_element_bytes;
    mask_row_stride = p.mask_stride[2];
    mask_col_stride = p.mask_stride[3];
    q_len = seq.q_len;
    kv_len = seq.kv_len;
    offset = p.bottom_right ? seq.kv_len - seq.q_len : 0;
    window_left = p.window_left;
    window_right = p.window_right;
  }

  __device__ __forceinline__ bool in_window(int64_t i, int64_t j) const {
    const int64_t d = j - i - offset;
    return i < q_len && j < kv_len && (window_left < 0 || d >= -window_left) &&
           (window_right < 0 || d <= window_right);
  }

  // The mask entry of (i, j), in bounds only (callers check in_window first). An additive
  // mask is in the element dtype or float32, which is read as is: torch's SDPA adds a float32
  // mask to fp16 / bf16 scores at float32 precision, and rounding a large bias (ALiBi-like,
  // relative positions) to bf16 would shift the scores by its rounding error.
  template <typename Element>
  __device__ __forceinline__ float mask_bias(int64_t i, int64_t j) const {
    const int64_t index = i * mask_row_stride + j * mask_col_stride;
    if (mask_is_bool) return mask[index] ? 0.0f : -INFINITY;
    if (mask_is_float32) return reinterpret_cast<const float*>(mask)[index];
    return ElementTraits<Element>::to_float(reinterpret_cast<const Element*>(mask)[index]);
  }

  // Keys [j_begin, j_end) any of the queries [i_first, i_last] may see (window only).
  __device__ __forceinline__ void key_range(int64_t i_first, int64_t i_last, int64_t& j_begin,
                                            int64_t& j_end) const {
    i_last = i_last < q_len - 1 ? i_last : q_len - 1;
    j_begin = window_left < 0 ? 0 : i_first + offset - window_left;
    j_end = window_right < 0 ? kv_len : i_last + offset + window_right + 1;
    j_begin = j_begin < 0 ? 0 : j_begin;
    j_end = j_end > kv_len ? kv_len : j_end;
  }

  // Queries [i_begin, i_end) that may see any of the keys [j_first, j_last] (window only).
  __device__ __forceinline__ void query_range(int64_t j_first, int64_t j_last, int64_t& i_begin,
                                              int64_t& i_end) const {
    j_last = j_last < kv_len - 1 ? j_last : kv_len - 1;
    i_begin = window_right < 0 ? 0 : j_first - offset - window_right;
    i_end = window_left < 0 ? q_len : j_last - offset + window_left + 1;
    i_begin = i_begin < 0 ? 0 : i_begin;
    i_end = i_end > q_len ? q_len : i_end;
  }

  // Whether every (i, j) of the tile is in bounds and in the window, with no per-element
  // term: then the score is just scale * q.k.
  __device__ __forceinline__ bool tile_is_plain(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return !has_mask && !has_alibi && softcap <= 0.0f && in_window(i0, j0) && in_window(i0, j1) &&
           in_window(i1, j0) && in_window(i1, j1);
  }

  // Block-uniform: whether a mask leaves any (i, j) of the [i0, i0+ROWS) x [j0, j0+COLS) tile
  // visible. Without a mask every tile inside key_range / query_range has a visible element.
  // Must be reached by every thread of the block (it is a barrier).
  template <typename Element, int ROWS, int COLS, int NUM_THREADS>
  __device__ __forceinline__ bool tile_has_visible(int64_t i0, int64_t j0, int tid) const {
    if (!has_mask) return true;
    int any = 0;
    for (int idx = tid; idx < ROWS * COLS && !any; idx += NUM_THREADS) {
      const int64_t i = i0 + idx / COLS, j = j0 + idx % COLS;
      if (in_window(i, j) && mask_bias<Element>(i, j) != -INFINITY) any = 1;
    }
    return __syncthreads_or(any) != 0;
  }

  // The score of (i, j) from z = q.k; -inf where not visible. *dscore_dz (when non-null)
  // receives d score / d z (scale times the softcap's tanh derivative).
  template <typename Element>
  __device__ __forceinline__ float score(float z, int64_t i, int64_t j, float* dscore_dz) const {
    float s = z * scale;
    float ds_dz = scale;
    if (softcap > 0.0f) {
      const float t = tanhf(s / softcap);
      s = softcap * t;
      ds_dz = scale * (1.0f - t * t);
    }
    if (dscore_dz) *dscore_dz = ds_dz;
    if (!in_window(i, j)) return -INFINITY;
    if (has_alibi) s += slope * static_cast<float>(j - i - offset);
    if (has_mask) s += mask_bias<Element>(i, j);
    return s;
  }
};

// Dropout keep factor of (b, h, i, j): 0 or 1 / (1 - p).
__device__ __forceinline__ float dropout_factor(const AttentionParams& p, int64_t row_base, int64_t j) {
  // row_base = (index of row (b, h, i) in lse) * S
  const float u = philox_uniform(p.seed, static_cast<uint64_t>(row_base + j));
  return u >= p.dropout_p ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace attn
}  // namespace fastattn
