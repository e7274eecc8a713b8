"""fastattn.MultiheadAttention: ``nn.MultiheadAttention``'s interface on fastattn's attention op."""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastattn.ops import attention as attention_ops
from fastattn.ops import linear as linear_ops
from fastattn.ops import torchscript as torchscript_ops
from fastattn.ops.errors import (
    FastattnDtypeAssertionError,
    FastattnShapeAssertionError,
    FastattnTypeError,
    FastattnValueError,
)


class MultiheadAttention(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.MultiheadAttention`.

    Same constructor, forward signature, parameters (names, shapes, initialization) and
    ``state_dict`` keys as torch's module, so weights load both ways: a packed
    ``in_proj_weight`` [3E, E] when ``kdim == vdim == embed_dim``, else ``q_proj_weight`` [E, E],
    ``k_proj_weight`` [E, kdim] and ``v_proj_weight`` [E, vdim]; ``in_proj_bias`` [3E];
    ``bias_k``/``bias_v`` [1, 1, E] with ``add_bias_kv``; ``out_proj`` a Linear(E, E).

    Two paths compute attention:

    - ``need_weights=False`` is the fused path: ``fastattn.scaled_dot_product_attention`` on
      whichever fastattn backend serves the tensors, with dropout applied inside the op in
      training. ``key_padding_mask`` and ``attn_mask`` are merged into one broadcastable
      mask ([B, 1, 1, S], [1, 1, L, S], [B, 1, L, S] or, for a per-head 3-D ``attn_mask``,
      [B, H, L, S]); bool masks stay bool, so no float mask per head is built for them. A
      query whose keys are all blocked gets a zero output row there, as torch's module gives in
      training (through its scaled_dot_product_attention); in eval, torch's fast path returns
      NaN for that row.
    - ``need_weights=True`` (torch's default) computes the softmax weights explicitly, as torch
      does, and returns them averaged over heads ([B, L, S]) or per head ([B, H, L, S]).

    Masks follow torch's MHA convention: in a bool mask ``True`` means *blocked*; a float mask
    is added to the scores. ``is_causal=True`` is a hint that ``attn_mask`` is the causal mask,
    exactly as in torch: ``attn_mask`` is then still required, and it is replaced by the op's
    causal visibility only when ``need_weights=False`` and no ``key_padding_mask`` is given.

    ``torch.jit.script`` compiles the module (and torch's Transformer layers holding it); the
    scripted fused path calls the C++ op directly (``fastattn.ops.torchscript``).
    """

    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise FastattnValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                f"and num_heads={num_heads}"
            )
        if embed_dim % num_heads != 0:  # torch asserts it
            raise FastattnShapeAssertionError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # torch's TransformerEncoderLayer and TransformerEncoder read this private attribute to
        # decide whether to bypass ``self_attn.forward`` with torch's own fused kernels
        # (torch._transformer_encoder_layer_fwd, nested tensors). Always False, so a layer holding
        # this module really runs it; whether the in-projection is packed is ``_packed_in_proj``.
        # An instance attribute, so that TorchScript sees it when it compiles such a layer.
        self._qkv_same_embed_dim = False
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._packed_in_proj = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn

        # Created in torch's order, so the same seed gives the same initial weights as torch.
        if self._packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(
            embed_dim, embed_dim, bias=bias, **factory
        )
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's init: Xavier-uniform projections, zero biases, Xavier-normal bias_k/v."""
        if self._packed_in_proj:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Args:
            query: [L, N, E] ([N, L, E] if batch_first) or unbatched [L, E].
            key: [S, N, kdim] ([N, S, kdim] if batch_first) or unbatched [S, kdim].
            value: [S, N, vdim] ([N, S, vdim] if batch_first) or unbatched [S, vdim].
            key_padding_mask: [N, S] (unbatched [S]); bool (True = ignore that key) or float
                (added to the scores).
            need_weights: return the attention weights (explicit path); False runs the fused op.
            attn_mask: [L, S] or [N * num_heads, L, S] (unbatched [num_heads, L, S]); bool
                (True = blocked) or float (added to the scores).
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (see the class docstring).

        Returns:
            (attn_output, attn_weights): attn_output in query's layout and dtype; attn_weights
            [N, L, S] (averaged) or [N, num_heads, L, S], unbatched without N, None when
            ``need_weights`` is False. S includes the bias_kv and zero-attention keys.
        """
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal=True is a hint that attn_mask is the causal mask, so attn_mask is "
                "required with it (as in torch); build it with "
                "nn.Transformer.generate_square_subsequent_mask(L)"
            )
        # torch's rule: the hint replaces attn_mask only on the fused path without padding mask,
        # before the mask is checked (so torch's CausalBias masks pass there too).
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        # Which inputs are the same tensor decides how many projection GEMMs run.
        self_attention = query is key and key is value
        shared_kv = key is value
        if not is_batched:  # a batch of one, sequence first
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_dim = 0 if self.batch_first and is_batched else 1
        batch = query.shape[batch_dim]
        tgt_len, src_len = query.shape[1 - batch_dim], key.shape[1 - batch_dim]
        if key.shape[batch_dim] != batch or value.shape[batch_dim] != batch:
            raise FastattnValueError(
                f"query, key and value must share the batch size, got {batch}, "
                f"{key.shape[batch_dim]} and {value.shape[batch_dim]}"
            )

        q, k, v = self._project(query, key, value, self_attention, shared_kv)
        q = _split_heads(q, batch_dim, self.num_heads)  # [B, H, T, D]
        k = _split_heads(k, batch_dim, self.num_heads)
        v = _split_heads(v, batch_dim, self.num_heads)
        extra_keys = 0
        bias_k, bias_v = self.bias_k, self.bias_v  # locals, so TorchScript refines the Optional
        if bias_k is not None and bias_v is not None:  # add_bias_kv: both exist together
            k = torch.cat([k, _bias_as_key(bias_k, batch, self.num_heads)], dim=2)
            v = torch.cat([v, _bias_as_key(bias_v, batch, self.num_heads)], dim=2)
            extra_keys += 1
        if self.add_zero_attn:
            zero_key = [batch, self.num_heads, 1, self.head_dim]
            k = torch.cat([k, k.new_zeros(zero_key)], dim=2)
            v = torch.cat([v, v.new_zeros(zero_key)], dim=2)
            extra_keys += 1

        mask = _merge_masks(
            key_padding_mask, attn_mask, batch, self.num_heads, tgt_len, src_len, extra_keys,
            query.dtype,
        )
        dropout_p = self.dropout if self.training else 0.0

        weights: Tensor | None = None
        if need_weights:
            # [B, H, L, S]: the same arithmetic as torch's explicit path, so the weights match.
            scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
            if mask is not None:
                if mask.dtype == torch.bool:
                    # Added as -inf, as torch's explicit path adds its masks: a query with every
                    # key blocked gets NaN weights and a NaN gradient into q, k and the
                    # projections, as in torch (masked_fill would zero that gradient).
                    blocked = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device)
                    scores = scores + blocked.masked_fill_(~mask, float("-inf"))
                else:
                    # A float32 mask with half scores (torch raises there): added at float32.
                    scores = (scores + mask).to(scores.dtype)
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
        elif torch.jit.is_scripting():
            out = torchscript_ops.scaled_dot_product_attention(q, k, v, mask, dropout_p, use_causal)
        else:
            out = attention_ops.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal
            )

        out = _merge_heads(out, batch_dim)  # [B, L, E] or [L, B, E]
        out = _linear(out, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    @torch.jit.unused
    def merge_masks(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> tuple[Tensor | None, int | None]:
        """Not supported. torch's encoder layers call ``self_attn.merge_masks`` only on their
        native fast path, which a layer holding this module never takes (``_qkv_same_embed_dim``
        is False); it is declared so that such a layer compiles under ``torch.jit.script``."""
        raise NotImplementedError(
            "fastattn.MultiheadAttention merges its masks inside forward; torch's encoder fast "
            "path that calls merge_masks does not run with it"
        )

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The in-projections; one GEMM for self-attention, two when key is value."""
        E = self.embed_dim
        b = self.in_proj_bias
        b_q: Tensor | None = None
        b_k: Tensor | None = None
        b_v: Tensor | None = None
        b_kv: Tensor | None = None
        if b is not None:  # (TorchScript compiles this block only when the bias exists)
            if b.dtype != query.dtype:
                # torch adds a bias of another dtype in the projection's dtype (type promotion).
                b = b.to(query.dtype)
            b_q, b_k, b_v = b.chunk(3)
            b_kv = b[E:]
        # `w is None` rather than self._packed_in_proj: TorchScript then compiles only the branch
        # whose weights exist (the others are None attributes).
        w = self.in_proj_weight
        if w is None:
            return (
                _linear(query, self.q_proj_weight, b_q),
                _linear(key, self.k_proj_weight, b_k),
                _linear(value, self.v_proj_weight, b_v),
            )
        if self_attention:
            q, k, v = _linear(query, w, b).chunk(3, dim=-1)
            return q, k, v
        w_q, w_k, w_v = w.chunk(3)
        q = _linear(query, w_q, b_q)
        if shared_kv:
            k, v = _linear(key, w[E:], b_kv).chunk(2, dim=-1)
            return q, k, v
        return q, _linear(key, w_k, b_k), _linear(value, w_v, b_v)

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> bool:
        """Validates ranks, feature sizes and mask dtypes; returns whether the input is batched."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise FastattnTypeError(
                "fastattn.MultiheadAttention does not take nested tensors; pad them"
            )
        # The checks torch makes with assert raise errors that are AssertionError too.
        if query.dim() not in (2, 3):
            raise FastattnShapeAssertionError(
                f"query must be 3-D (batched) or 2-D (unbatched), got a {query.dim()}-D tensor"
            )
        is_batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise FastattnShapeAssertionError(
                f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and "
                f"{value.dim()}-D"
            )
        _check_features("query", query, self.embed_dim)
        _check_features("key", key, self.kdim)
        _check_features("value", value, self.vdim)
        seq_dim = 1 if self.batch_first and is_batched else 0
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise FastattnShapeAssertionError(
                f"key and value must have the same length, got {key.shape[seq_dim]} and "
                f"{value.shape[seq_dim]}"
            )
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
        batch = query.shape[1 - seq_dim] if is_batched else 1
        if key_padding_mask is not None:
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            expected = [batch, src_len] if is_batched else [src_len]
            if list(key_padding_mask.shape) != expected:
                raise FastattnShapeAssertionError(
                    f"key_padding_mask must have shape {expected} (batch, source length), got "
                    f"{list(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask)
            shape = list(attn_mask.shape)
            per_head = [batch * self.num_heads, tgt_len, src_len]
            if shape != [tgt_len, src_len] and shape != per_head:
                raise FastattnValueError(
                    f"attn_mask must have shape {[tgt_len, src_len]} or {per_head} ((batch * "
                    f"num_heads, target length, source length)), got {shape}"
                )
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn(
                "key_padding_mask and attn_mask of different dtypes are deprecated in torch; "
                "both are used as float masks",
                stacklevel=3,
            )
        return is_batched


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A projection: F.linear, on fastattn's own CPU GEMM where it beats torch.mm's."""
    if torch.jit.is_scripting():
        return F.linear(x, weight, bias)
    else:
        return linear_ops.linear(x, weight, bias)


def _check_features(name: str, x: Tensor, size: int) -> None:
    if x.shape[-1] != size:
        raise FastattnShapeAssertionError(
            f"{name} must have {size} features (last dim), got {x.shape[-1]}")


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise FastattnDtypeAssertionError(
            f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


def _split_heads(x: Tensor, batch_dim: int, num_heads: int) -> Tensor:
    """[B, T, H*D] (batch_dim 0) or [T, B, H*D] (batch_dim 1) -> a [B, H, T, D] view."""
    x = x.unflatten(-1, [num_heads, -1])
    return x.permute(0, 2, 1, 3) if batch_dim == 0 else x.permute(1, 2, 0, 3)


def _merge_heads(x: Tensor, batch_dim: int) -> Tensor:
    """[B, H, L, D] -> [B, L, H*D] (batch_dim 0) or [L, B, H*D] (batch_dim 1)."""
    x = x.permute(0, 2, 1, 3) if batch_dim == 0 else x.permute(2, 0, 1, 3)
    return x.flatten(-2)


def _bias_as_key(bias: Tensor, batch: int, num_heads: int) -> Tensor:
    """bias_k / bias_v [1, 1, H*D] -> one extra key [B, H, 1, D] for every batch element."""
    return bias.view(num_heads, 1, -1).expand(batch, -1, -1, -1)


def _merge_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    batch: int,
    num_heads: int,
    tgt_len: int,
    src_len: int,
    extra_keys: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """One broadcastable [B|1, H|1, L|1, S + extra_keys] mask in the op's convention.

    Bool when both masks are bool (True = may attend), else additive of ``dtype`` (a blocked bool
    entry becomes -inf), or float32 when a float32 mask comes with a half-precision ``dtype``:
    torch adds such a mask at float32 precision, and so does fastattn's op. Only the dims the
    inputs really have are materialized; the extra keys (bias_kv, zero attention) are always
    visible.
    """
    masks: list[Tensor] = []
    if key_padding_mask is not None:  # [B, S]
        masks.append(key_padding_mask.view(batch, 1, 1, src_len))
    if attn_mask is not None:  # [L, S] or [B*H, L, S]
        if attn_mask.dim() == 2:
            masks.append(attn_mask.view(1, 1, tgt_len, src_len))
        else:
            masks.append(attn_mask.view(batch, num_heads, tgt_len, src_len))
    if len(masks) == 0:
        return None
    all_bool = True
    for m in masks:
        all_bool = all_bool and m.dtype == torch.bool
    if all_bool:
        blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        merged = ~blocked
        fill = 1.0  # padded into a bool mask: True
    else:
        additive: list[Tensor] = []
        for m in masks:
            if m.dtype == torch.bool:
                additive.append(torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf")))
            elif m.dtype == torch.float32:
                additive.append(m)
            else:
                additive.append(m.to(dtype))
        # (a float32 mask promotes the sum to float32)
        merged = additive[0] if len(additive) == 1 else additive[0] + additive[1]
        fill = 0.0
    if extra_keys > 0:
        merged = F.pad(merged, [0, extra_keys], value=fill)
    return merged
