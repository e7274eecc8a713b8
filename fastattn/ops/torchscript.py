"""The fused attention call of fastattn's modules under ``torch.jit.script``.

TorchScript cannot compile ``fastattn.ops.attention`` (dataclasses, the backend registry,
Triton, compile hints), so a scripted ``fastattn.MultiheadAttention`` calls this instead: the
C++ op ``fastattn::attention_fwd`` directly (its autograd is registered on the op, so scripted
training works too). It serves what that op serves: CPU tensors of every float dtype, and CUDA
float16/bfloat16 with the CUDA head dims when the extension was built with CUDA.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.ops import _registry  # noqa: F401  (defines the fastattn::* schemas)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> Tensor:
    """fastattn.scaled_dot_product_attention on [B, H, L, E] inputs, scriptable.

    attn_mask: bool (True = may attend) or additive, broadcastable to [B, H, L, S].
    """
    B, H, L, E = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    S = k.shape[2]
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        # Zero-size dims: the kernel's grid needs positive sizes; torch's op returns what
        # fastattn returns there (empty, or zeros when S = 0).
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    mask: Tensor | None = None
    if attn_mask is not None:
        mask = attn_mask.expand(B, H, L, S)
        # The op adds a float32 mask at float32 precision whatever q's dtype (as torch and the
        # eager path); other float dtypes become q's.
        if mask.dtype != torch.bool and mask.dtype != q.dtype and mask.dtype != torch.float32:
            mask = mask.to(q.dtype)
    rng_seed: Tensor | None = None
    if dropout_p > 0.0:
        rng_seed = torch.randint(0, 1 << 62, [], dtype=torch.int64)  # as the eager path draws it
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    window_right = 0 if is_causal else -1
    out, _ = torch.ops.fastattn.attention_fwd(
        q, k, v, mask, None, dropout_p, rng_seed, 1.0 / math.sqrt(E), -1, window_right, False,
        0.0,
    )
    return out
