"""Every fastattn::* op schema, in one place.

C++ kernels register implementations for these names (TORCH_LIBRARY_IMPL in csrc/), the ops
modules register fake kernels and autograd. Triton ops are defined by torch.library.triton_op
in fastattn/triton_kernels/ and mirror the schemas below under a ``_triton`` suffix.

Normalized attention layout, shared by every backend:
  q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev], Hq % Hk == 0 (GQA: head h reads kv
  head h // (Hq // Hk)); last dims contiguous, other strides arbitrary.
  attn_mask: None, or a bool (True = may attend) or additive tensor of q's dtype, given as
  a [B, Hq, L, S] view whose broadcast strides may be 0.
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
    # dmask is [B, Hq, L, S] float32 when mask_grad, else an empty tensor.
    "attention_bwd": "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
    f"Tensor lse, {_ATTENTION_OPTIONS}, bool mask_grad) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)",
}

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)
