"""Every fastattn::* op schema, in one place.

C++ kernels register implementations for these names (TORCH_LIBRARY_IMPL in csrc/), the ops
modules register fake kernels and autograd. Triton ops are defined by torch.library.triton_op
in fastattn/triton_kernels/ and mirror the schemas below under a ``_triton`` suffix.

Normalized attention layout, shared by every backend:
  q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev], Hq % Hk == 0 (GQA: head h reads kv
  head h // (Hq // Hk)); last dims contiguous, other strides arbitrary.
  attn_mask: None, or a bool (True = may attend) or additive tensor of q's dtype (or float32,
  which every backend reads at float32 precision), given as a [B, Hq, L, S] view whose
  broadcast strides may be 0.
  alibi_slopes: None or float32 [Hq] or [B, Hq]; adds slope * (j - i - offset) to score (i, j).
  Visibility: key j is visible to query i iff  -window_left <= j - i - offset <= window_right
  (a negative bound is unbounded), offset = S - L if bottom_right else 0. Causal is
  window_right = 0.
  softcap > 0: scores become softcap * tanh(scores / softcap) (after scaling, before bias/mask).
  dropout: keep (i, j) iff philox_uniform(seed, counter) >= dropout_p, counter = linear index
  of (b, h, i, j) in [B, Hq, L, S] (see fastattn/ops/reference.py: dropout_keep_mask);
  rng_seed is an int64 CPU scalar tensor, None when dropout_p == 0.
  Returns out [B, Hq, L, Ev] (q's dtype) and lse [B, Hq, L] float32 (natural log; -inf for a
  row with no visible key, whose output row is 0).
"""

from __future__ import annotations

import torch

LIBRARY = torch.library.Library("fastattn", "DEF")

_ATTENTION_OPTIONS = (
    "Tensor? attn_mask, Tensor? alibi_slopes, float dropout_p, Tensor? rng_seed, float scale, "
    "int window_left, int window_right, bool bottom_right, float softcap"
)

SCHEMAS = {
    "attention_fwd": f"attention_fwd(Tensor q, Tensor k, Tensor v, {_ATTENTION_OPTIONS}) "
    "-> (Tensor out, Tensor lse)",
    # dmask is [B, Hq, L, S] when mask_grad, else an empty tensor; float32 (float64 for
    # float64 inputs on the CPU).
    "attention_bwd": "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
    f"Tensor lse, {_ATTENTION_OPTIONS}, bool mask_grad) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)",
}

# Varlen and KV-cache attention (fastattn/ops/packed_attention.py): per sequence, attention_fwd's
# math with L = Lq_b, S = Sk_b (bottom_right offset Sk_b - Lq_b); the kernels read the offsets
# themselves (no host sync, no per-sequence launch).
#   Varlen: q [total_q, Hq, E], k [total_k, Hk, E], v [total_k, Hk, Ev] (token-major; last dim
#   contiguous, other strides arbitrary). cu_seqlens_q / cu_seqlens_k: int32 [B + 1] on q's device,
#   from 0, non-decreasing, last == total; sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
#   and k/v rows cu_seqlens_k[b]:cu_seqlens_k[b+1] (either may be empty). max_seqlen_q /
#   max_seqlen_k bound the lengths (they size the grids). alibi_slopes [Hq] or [B, Hq].
#   Dropout counter of (b, h, i, j): ((h * total_q) + cu_seqlens_q[b] + i) * max_seqlen_k + j,
#   i.e. attention_fwd's for a batch of 1 with L = total_q, S = max_seqlen_k and the query's
#   global row (reference.dropout_keep_mask gives the bits).
#   Returns out [total_q, Hq, Ev] (q's dtype, contiguous) and lse float32 [Hq, total_q]; the
#   backward returns dq, dk, dv contiguous like q, k, v.
#   KV cache: q [B, Hq, Lq, E]; cache_seqlens int32 [B] = valid positions before the append.
#   Contiguous cache (block_table None): k_cache [B_cache, Hk, S_max, E], v_cache [B_cache, Hk,
#   S_max, Ev]; sequence b uses cache row cache_batch_idx[b] (int32 [B]), or b when None.
#   Paged (block_table int32 [B, max_blocks]): k_cache [num_blocks, Hk, block_size, E], v_cache
#   [num_blocks, Hk, block_size, Ev]; position p of sequence b is row p % block_size of block
#   block_table[b, p // block_size]; cache_batch_idx must be None. Any cache strides with a
#   contiguous last dim (FlashAttention's / vLLM's [num_blocks, block_size, Hk, E] passed as
#   .transpose(1, 2) is read and written in place).
#   k_new [B, Hk, L_new, E] / v_new [B, Hk, L_new, Ev] (both or neither) are written into the
#   caches at positions cache_seqlens[b] .. cache_seqlens[b] + L_new - 1, after every argument
#   is validated; then the queries attend over positions [0, cache_seqlens[b] + L_new)
#   (bottom_right offset cache_seqlens[b] + L_new - Lq). cache_seqlens is not changed. No dropout,
#   no mask, not differentiable. Returns out [B, Hq, Lq, Ev] (q's dtype, contiguous) and lse
#   float32 [B, Hq, Lq].
_VARLEN_OPTIONS = (
    "Tensor? alibi_slopes, float dropout_p, Tensor? rng_seed, float scale, int window_left, "
    "int window_right, bool bottom_right, float softcap"
)
_VARLEN_SEQUENCES = (
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k"
)

SCHEMAS.update({
    "attention_varlen_fwd": f"attention_varlen_fwd(Tensor q, Tensor k, Tensor v, "
    f"{_VARLEN_SEQUENCES}, {_VARLEN_OPTIONS}) -> (Tensor out, Tensor lse)",
    "attention_varlen_bwd": "attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
    f"Tensor out, Tensor lse, {_VARLEN_SEQUENCES}, {_VARLEN_OPTIONS}) "
    "-> (Tensor dq, Tensor dk, Tensor dv)",
    "attention_kv_cache_fwd": "attention_kv_cache_fwd(Tensor q, Tensor(a!) k_cache, "
    "Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, Tensor? block_table, "
    "Tensor? cache_batch_idx, Tensor? alibi_slopes, float scale, int window_left, "
    "int window_right, bool bottom_right, float softcap) -> (Tensor out, Tensor lse)",
})

# LSTM (fastattn/ops/lstm.py). Gate chunks are in torch's order i, f, g, o (i, f, o sigmoid,
# g tanh); cy = f * cx + i * g, hy = o * tanh(cy); math in float32 for half/bfloat16 inputs.
#
# Cell pointwise ops: gates [B, 4H] = x @ W_ih^T + b_ih + h @ W_hh^T + b_hh (pre-activation);
# cx, hy, cy, grad_hy, grad_cy [B, H]; grad_gates [B, 4H] is the pre-activation gradient.
#
# Sequence ops run one layer in one direction over a whole (padded) sequence:
#   x_proj [T, B, 4H] = x @ W_ih^T + b_ih + b_hh, precomputed by one GEMM for the sequence;
#   h0 [B, P], c0 [B, H]; w_hh [4H, P]; w_hr [P, H] or None (P = proj_size, else P = H).
#   Outputs are the states after each time step, in time order: h_all [T, B, P], c_all [T, B, H];
#   gates_all [T, B, 4H] holds the ACTIVATED gates (i, f, g, o after sigmoid/tanh) in the math
#   dtype on every device (float32 for half/bfloat16: the backward's dc = grad_c + grad_h * o *
#   (1 - tanh^2(c)) can cancel, and rounded gates then give grad c0 percent-level errors).
#   x_proj may have any layout; fastattn.ops.lstm computes it in the one the CPU kernel reads
#   fastest: step-major ([T, 4H, B] in memory) where its vector lanes run along the batch,
#   row-major where they run along the units (small batches, and bfloat16 without a projection
#   where its recurrent products run on oneDNN's brgemm: fastattn.ops.lstm._cpu_unit_lanes).
#   On CPU, where x_proj's batch stride is 1 (step-major), gates_all is step-major and
#   grad_x_proj feature-major ([4H, T, B] in memory, one [4H, T * B] matrix for the weight
#   gradients' GEMMs); otherwise both are contiguous;
#   hpre_all [T, B, H] = o * tanh(c) before the projection (empty when w_hr is None).
#   The step at time t reads the state of time t - 1 (t + 1 when reverse), h0/c0 at the first
#   step (t = 0, or t = T - 1 when reverse). So h_n = h_all[T - 1] (h_all[0] when reverse).
#   batch_sizes: None, or int64 CPU [T], non-increasing: at time t only rows b < batch_sizes[t]
#   step (packed sequences sorted by decreasing length); the other rows carry their state
#   unchanged (so h_all[T - 1] / h_all[0] still hold every row's final state) and get zero
#   gradients into x_proj.
#   zoneout_c [T, B, H], zoneout_h [T, B, P]: None, or the weight of the PREVIOUS state in
#   x_proj's dtype (Bernoulli 0/1 in training, the probability in eval):
#   c_t = z_c * c_{t-1} + (1 - z_c) * c_new, h_t = z_h * h_{t-1} + (1 - z_h) * h_new, where
#   c_new = f * c_{t-1} + i * g and h_new = (o * tanh(c_new)) @ w_hr^T (or o * tanh(c_new)).
# lstm_sequence_fwd is the option-free forward (the CUDA persistent kernel serves it; CPU too).
_LSTM_LAYER_OPTIONS = (
    "Tensor? w_hr, Tensor? batch_sizes, bool reverse, Tensor? zoneout_c, Tensor? zoneout_h"
)

SCHEMAS.update({
    "lstm_cell_pointwise_fwd": "lstm_cell_pointwise_fwd(Tensor gates, Tensor cx) "
    "-> (Tensor hy, Tensor cy)",
    "lstm_cell_pointwise_bwd": "lstm_cell_pointwise_bwd(Tensor grad_hy, Tensor grad_cy, "
    "Tensor gates, Tensor cx, Tensor cy) -> (Tensor grad_gates, Tensor grad_cx)",
    "lstm_sequence_fwd": "lstm_sequence_fwd(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh) "
    "-> (Tensor h_all, Tensor c_all, Tensor gates_all)",
    "lstm_layer_fwd": "lstm_layer_fwd(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh, "
    f"{_LSTM_LAYER_OPTIONS}) -> (Tensor h_all, Tensor c_all, Tensor gates_all, Tensor hpre_all)",
    # Inference only (no autograd): lstm_layer_fwd's h_all and c_all, with x_proj = input @ w_ih^T
    # + bias computed inside, a few steps at a time, and no gates saved.
    "lstm_layer_infer": "lstm_layer_infer(Tensor input, Tensor w_ih, Tensor? bias, Tensor h0, "
    f"Tensor c0, Tensor w_hh, {_LSTM_LAYER_OPTIONS}) -> (Tensor h_all, Tensor c_all)",
    # lstm_layer_infer's schema and results, differentiable: lstm_layer_infer where no gradient
    # is needed, the input projection and lstm_layer_fwd where one is (a Python composite,
    # fastattn/ops/lstm.py). One op either way, so that torch.jit.trace records the same node
    # with and without grad mode (its check re-traces under no_grad), and a traced model takes
    # the inference kernel under no_grad and trains with grad.
    "lstm_layer": "lstm_layer(Tensor input, Tensor w_ih, Tensor? bias, Tensor h0, Tensor c0, "
    f"Tensor w_hh, {_LSTM_LAYER_OPTIONS}) -> (Tensor h_all, Tensor c_all)",
    # The same for one step of fastattn.lstm_cell on the CPU: input [B, I], hx / cx [B, H],
    # w_ih [4H, I], w_hh [4H, H], bias [4H] or None -> (hy, cy) [B, H]; lstm_layer_infer for one
    # step without gradients, else two GEMMs and lstm_cell_pointwise_fwd.
    "lstm_cell": "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
    "Tensor? bias) -> (Tensor hy, Tensor cy)",
    # grad_h_all / grad_c_all: gradients of h_all / c_all (the final state's gradient included).
    # grad_w_hr is empty when w_hr is None.
    "lstm_layer_bwd": "lstm_layer_bwd(Tensor grad_h_all, Tensor grad_c_all, Tensor h0, Tensor c0, "
    f"Tensor w_hh, {_LSTM_LAYER_OPTIONS}, Tensor h_all, Tensor c_all, Tensor gates_all, "
    "Tensor hpre_all) -> (Tensor grad_x_proj, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, "
    "Tensor grad_w_hr)",
    # CPU only: out [S, M, N] = weight [M, K] @ x [S, K, N] (+ bias[:, None]), contiguous, as
    # torch.matmul broadcasts weight, on fastattn's own GEMM (cpu_gemm.h): the training input
    # projection computes x_proj step-major with it (weight = w_ih, x = input.transpose(1, 2)),
    # and the backwards of this op and of linear their weight and input gradients.
    "lstm_weight_mm": "lstm_weight_mm(Tensor weight, Tensor x, Tensor? bias) -> Tensor",
    # CPU only: gates [B, 4H] = input [B, I] @ w_ih^T + hx [B, H] @ w_hh^T (+ bias [4H]), before
    # the activations, contiguous: the products of a training cell step of a few rows, which a
    # GEMV-style kernel computes faster than two GEMMs (fastattn.ops.lstm's lstm_cell).
    "lstm_step_gates": "lstm_step_gates(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, "
    "Tensor? bias) -> Tensor",
})

# fastattn's own float32 CPU GEMM (csrc/include/fastattn/cpu_gemm.h; other dtypes on at::mm).
SCHEMAS.update({
    # CPU only: out [M, N] = input [M, K] @ weight [N, K]^T (+ bias [N]), contiguous (F.linear's
    # product): the LSTM's training input projection of a row-major x_proj (input = the input's
    # rows, weight = w_ih), where the CPU kernels' lanes run along the units, and
    # fastattn.ops.linear where that GEMM beats torch.mm.
    "linear": "linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor",
})

# LayerNorm-LSTM layer ops: one layer in one direction as lstm_layer_fwd / _bwd (same layouts,
# batch_sizes, reverse, w_hr and zoneout semantics), with the step
#   gates = x_proj[t] + LN(h_prev @ w_hh^T) * ln_hh_weight      (LN over the 4H gates, no bias)
#   c_new = LN(f * c_prev + i * g) * ln_c_weight + ln_c_bias    (LN over H)
#   h_new = o * tanh(c_new)                                      (then @ w_hr^T, zoneout as above)
# where LN(v) = (v - mean(v)) / sqrt(var(v) + eps) (biased variance) and x_proj is the caller's
# normalized input projection LN(x @ W_ih^T) * ln_ih_weight + b_ih + b_hh.
# ln_hh_weight [4H], ln_c_weight [H], ln_c_bias [H] in x_proj's dtype. Saved for the backward,
# besides h_all, c_all, hpre_all: gates_all [T, B, 4H] (activated), hh_norm_all [T, B, 4H] =
# LN(h_prev @ w_hh^T), c_norm_all [T, B, H] = LN(f * c_prev + i * g), rstd_all [T, B, 2] = the two
# LNs' 1 / sqrt(var + eps). gates_all, hh_norm_all, c_norm_all and rstd_all are in the math dtype
# (float32 for half/bfloat16 inputs, else the input dtype): the LN backward's sums cancel, and
# starting them from bfloat16-rounded values doubles the gradient error. Rows that do not step at
# time t (batch_sizes) hold zeros in gates_all, hpre_all, hh_norm_all, c_norm_all and rstd_all;
# with H == 0 (LNs over no elements, which have no statistics) all of rstd_all is zero.
_LSTM_LN_WEIGHTS = "Tensor ln_hh_weight, Tensor ln_c_weight, Tensor ln_c_bias"

SCHEMAS.update({
    "lstm_ln_layer_fwd": "lstm_ln_layer_fwd(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh, "
    f"{_LSTM_LN_WEIGHTS}, float eps, {_LSTM_LAYER_OPTIONS}) -> (Tensor h_all, Tensor c_all, "
    "Tensor gates_all, Tensor hpre_all, Tensor hh_norm_all, Tensor c_norm_all, Tensor rstd_all)",
    # grad_w_hr is empty when w_hr is None.
    "lstm_ln_layer_bwd": "lstm_ln_layer_bwd(Tensor grad_h_all, Tensor grad_c_all, Tensor h0, "
    f"Tensor c0, Tensor w_hh, {_LSTM_LN_WEIGHTS}, {_LSTM_LAYER_OPTIONS}, Tensor h_all, "
    "Tensor c_all, Tensor gates_all, Tensor hpre_all, Tensor hh_norm_all, Tensor c_norm_all, "
    "Tensor rstd_all) -> (Tensor grad_x_proj, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, "
    "Tensor grad_ln_hh_weight, Tensor grad_ln_c_weight, Tensor grad_ln_c_bias, Tensor grad_w_hr)",
})

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)
