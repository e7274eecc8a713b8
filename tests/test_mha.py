"""fastattn.MultiheadAttention against torch.nn.MultiheadAttention (float32) and a float64 copy."""

from __future__ import annotations

import copy
import importlib
import io
import pickle

import pytest
import torch
from helpers import assert_close_to_reference
from torch import nn

import fastattn

attention_ops = importlib.import_module("fastattn.ops.attention")

E, H = 24, 3  # head dim 8


def _modules(dtype=torch.float32, **kwargs):
    """torch's module with fresh random weights (biases too), ours loaded from it, and a float64
    copy of torch's as the oracle."""
    theirs = nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = fastattn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    ref64 = copy.deepcopy(theirs).double()
    return ours, theirs, ref64


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.is_floating_point())


def _run(module, inputs: dict, as_float64: bool = False):
    """Calls module on fresh leaf copies of the tensors in inputs (keeping which of query, key
    and value are the same tensor); returns (outputs, leaves)."""
    leaves, args = {}, {}
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor):
            args[name] = x
            continue
        alias = next((n for n in ("query", "key") if n != name and inputs.get(n) is x), None)
        if alias is not None and alias in leaves:
            args[name] = args[alias]
            continue
        t = x.double() if as_float64 and x.is_floating_point() else x
        leaves[name] = _leaf(t)
        args[name] = leaves[name]
    return module(**args), leaves


def _compare(ours, theirs, ref64, inputs: dict, dtype=torch.float32) -> None:
    """Outputs, weights, and the gradients of every parameter and floating input."""
    (out, w), ours_in = _run(ours, inputs)
    (out_t, w_t), theirs_in = _run(theirs, inputs)
    (out_r, w_r), ref_in = _run(ref64, inputs, as_float64=True)
    assert out.shape == out_t.shape and out.dtype == out_t.dtype
    assert_close_to_reference(out, out_r, out_t, dtype=dtype, name="attn_output")
    if w_t is None:
        assert w is None
    else:
        assert w.shape == w_t.shape
        assert_close_to_reference(w, w_r, w_t, dtype=dtype, name="attn_weights")

    grad_out = torch.randn_like(out_r)
    grad_w = None if w_r is None else torch.randn_like(w_r)
    for o, ww in ((out, w), (out_t, w_t), (out_r, w_r)):
        loss = (o * grad_out.to(o.dtype)).sum()
        if ww is not None:
            loss = loss + (ww * grad_w.to(ww.dtype)).sum()
        loss.backward()

    for name, leaf in ours_in.items():
        if leaf.grad is None or theirs_in[name].grad is None:
            # Unused by both (a mask replaced by the is_causal hint), or not differentiable.
            assert leaf.grad is None and theirs_in[name].grad is None, f"d{name} presence differs"
        else:
            assert_close_to_reference(
                leaf.grad, ref_in[name].grad, theirs_in[name].grad, dtype=dtype, name=f"d{name}"
            )
    theirs_params = dict(theirs.named_parameters())
    ref_params = dict(ref64.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"no gradient for parameter {name}"
        assert_close_to_reference(
            p.grad, ref_params[name].grad, theirs_params[name].grad, dtype=dtype, name=f"d{name}"
        )


def _bool_mask(*shape) -> torch.Tensor:
    """Random True = blocked, never blocking the first key, so every row keeps a key."""
    m = torch.rand(*shape) < 0.4
    m[..., 0] = False
    return m


def _mask(kind: str | None, batch: int, tgt_len: int, src_len: int, is_padding: bool):
    if kind is None:
        return None
    if is_padding:
        shape = (batch, src_len)
    else:
        shape = (tgt_len, src_len) if kind.endswith("2d") else (batch * H, tgt_len, src_len)
    blocked = _bool_mask(*shape)
    if kind.startswith("bool"):
        return blocked
    return torch.randn(*shape).masked_fill(blocked, float("-inf"))


def _qkv(batch_first: bool, batch: int, tgt_len: int, src_len: int, kdim=E, vdim=E):
    def seq(n, d):
        return torch.randn(batch, n, d) if batch_first else torch.randn(n, batch, d)

    return seq(tgt_len, E), seq(src_len, kdim), seq(src_len, vdim)


_MASK_PAIRS = [
    (kpm, mask)
    for kpm in (None, "bool", "float")
    for mask in (None, "bool2d", "float2d", "bool3d", "float3d")
    # Mixed bool/float pairs are deprecated in torch: test_mixed_mask_types covers one.
    if not (kpm and mask and kpm[0] != mask[0])
]


@pytest.mark.parametrize(
    "need_weights,average", [(False, True), (True, True), (True, False)],
    ids=["fused", "weights_avg", "weights_per_head"],
)
@pytest.mark.parametrize(
    # Both layouts, alternating over the mask pairs (test_flags_match_torch crosses them fully).
    "kpm_kind,mask_kind,batch_first",
    [(kpm, mask, i % 2 == 0) for i, (kpm, mask) in enumerate(_MASK_PAIRS)],
    ids=lambda k: str(k),
)
def test_masks_match_torch(need_weights, average, kpm_kind, mask_kind, batch_first):
    B, L, S = 2, 7, 5
    ours, theirs, ref64 = _modules(batch_first=batch_first)
    q, k, v = _qkv(batch_first, B, L, S)
    inputs = dict(
        query=q, key=k, value=v, need_weights=need_weights, average_attn_weights=average,
        key_padding_mask=_mask(kpm_kind, B, L, S, True),
        attn_mask=_mask(mask_kind, B, L, S, False),
    )
    _compare(ours, theirs, ref64, inputs)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_mixed_mask_types(need_weights):
    B, L, S = 2, 7, 5
    ours, theirs, ref64 = _modules()
    q, k, v = _qkv(False, B, L, S)
    inputs = dict(
        query=q, key=k, value=v, need_weights=need_weights,
        key_padding_mask=_mask("float", B, L, S, True), attn_mask=_mask("bool2d", B, L, S, False),
    )
    with pytest.warns(UserWarning, match="mismatched|different dtypes"):
        _compare(ours, theirs, ref64, inputs)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize(
    "flags",
    [
        dict(add_bias_kv=True),
        dict(add_zero_attn=True),
        dict(add_bias_kv=True, add_zero_attn=True),
        dict(kdim=10, vdim=6),
        dict(bias=False),
        dict(bias=False, add_bias_kv=True, add_zero_attn=True, kdim=10, vdim=6),
    ],
    ids=["bias_kv", "zero_attn", "bias_kv+zero_attn", "kdim_vdim", "no_bias", "all"],
)
def test_flags_match_torch(batch_first, need_weights, flags):
    B, L, S = 3, 1, 33
    ours, theirs, ref64 = _modules(batch_first=batch_first, **flags)
    q, k, v = _qkv(batch_first, B, L, S, flags.get("kdim", E), flags.get("vdim", E))
    inputs = dict(
        query=q, key=k, value=v, need_weights=need_weights,
        key_padding_mask=_mask("bool", B, L, S, True), attn_mask=_mask("bool3d", B, L, S, False),
    )
    _compare(ours, theirs, ref64, inputs)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("sharing", ["self", "shared_kv", "separate"])
def test_self_and_cross_attention(need_weights, sharing):
    ours, theirs, ref64 = _modules(batch_first=True)
    B, L, S = 2, 7, 7 if sharing == "self" else 9
    q, k, v = _qkv(True, B, L, S)
    if sharing == "self":
        k = v = q
    elif sharing == "shared_kv":
        v = k
    _compare(ours, theirs, ref64, dict(query=q, key=k, value=v, need_weights=need_weights))


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("mask_kind", [None, "bool2d", "float3d"], ids=lambda k: f"mask_{k}")
def test_unbatched(need_weights, mask_kind):
    ours, theirs, ref64 = _modules(batch_first=True, add_bias_kv=True)
    L, S = 7, 5
    q, k, v = torch.randn(L, E), torch.randn(S, E), torch.randn(S, E)
    kpm = _bool_mask(S) if mask_kind != "float3d" else torch.randn(S)
    inputs = dict(
        query=q, key=k, value=v, need_weights=need_weights, average_attn_weights=False,
        key_padding_mask=kpm, attn_mask=_mask(mask_kind, 1, L, S, False),
    )
    _compare(ours, theirs, ref64, inputs)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_non_contiguous_inputs(need_weights):
    ours, theirs, ref64 = _modules(batch_first=False, kdim=10, vdim=6)
    L, B, S = 7, 2, 5
    q = torch.randn(B, L, 2 * E)[:, :, ::2].transpose(0, 1)
    k = torch.randn(S, 10, B).transpose(1, 2)
    v = torch.randn(B, S, 6).transpose(0, 1)
    attn_mask = torch.randn(S, L).t()
    assert not any(x.is_contiguous() for x in (q, k, v, attn_mask))
    _compare(ours, theirs, ref64, dict(query=q, key=k, value=v, attn_mask=attn_mask,
                                       need_weights=need_weights))


def test_bfloat16_matches_torch():
    B, L, S = 2, 7, 5
    ours, theirs, ref64 = _modules(dtype=torch.bfloat16, batch_first=True)
    q, k, v = (x.bfloat16() for x in _qkv(True, B, L, S))
    inputs = dict(query=q, key=k, value=v, need_weights=False,
                  key_padding_mask=_mask("bool", B, L, S, True))
    _compare(ours, theirs, ref64, inputs, dtype=torch.bfloat16)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "jit.script"])
@pytest.mark.parametrize("masks", ["attn_mask", "attn_mask+kpm"])
def test_float32_mask_with_bfloat16_keeps_float32_precision_like_torch(masks, scripted):
    """torch's fused path adds a float32 attn_mask to bfloat16 scores at float32 precision; the
    merged mask was rounded to bfloat16 first (5x torch's error for a 30-sized bias), and under
    torch.jit.script still was after the eager path kept it."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours = fastattn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    ref64 = copy.deepcopy(theirs).double()
    x = torch.randn(2, 33, 64)
    attn_mask = torch.randn(33, 33) * 30  # an ALiBi / relative-position sized float32 bias
    kpm = _bool_mask(2, 33) if masks == "attn_mask+kpm" else None
    exact = ref64(*(x.double(),) * 3, attn_mask=attn_mask.double(), key_padding_mask=kpm,
                  need_weights=False)[0]

    def error(module, script=False):
        xb = x.bfloat16()
        module = copy.deepcopy(module).bfloat16()
        module = torch.jit.script(module) if script else module
        out = module(xb, xb, xb, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False)[0]
        assert out.dtype == torch.bfloat16
        return ((out.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(ours, scripted) <= 1.5 * error(theirs), (error(ours, scripted), error(theirs))


class TestIsCausal:
    L = 6

    def _causal(self):
        return nn.Transformer.generate_square_subsequent_mask(self.L)

    @pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
    @pytest.mark.parametrize("with_kpm", [False, True], ids=["no_kpm", "kpm"])
    @pytest.mark.parametrize(
        "flags", [{}, dict(add_bias_kv=True, add_zero_attn=True)], ids=["plain", "extra_keys"]
    )
    def test_matches_torch(self, need_weights, with_kpm, flags):
        """With extra keys the causal op sees S = L + 2 (top-left aligned), as torch's SDPA does."""
        ours, theirs, ref64 = _modules(batch_first=True, **flags)
        x = torch.randn(2, self.L, E)
        kpm = _mask("float", 2, self.L, self.L, True) if with_kpm else None
        inputs = dict(query=x, key=x, value=x, attn_mask=self._causal(), is_causal=True,
                      key_padding_mask=kpm, need_weights=need_weights)
        _compare(ours, theirs, ref64, inputs)

    def test_hint_replaces_the_mask_as_in_torch(self, monkeypatch):
        """Fused path without key_padding_mask: torch drops attn_mask for its causal kernel,
        trusting the hint; so do we (the op gets is_causal and no mask)."""
        calls = _spy(monkeypatch)
        ours, theirs, _ = _modules(batch_first=True)
        x = torch.randn(2, self.L, E)
        not_causal = torch.zeros(self.L, self.L)
        out = ours(x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)[0]
        expected = theirs(x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)[0]
        assert calls[-1]["is_causal"] and calls[-1]["attn_mask"] is None
        causal_out = ours(x, x, x, attn_mask=self._causal(), need_weights=False)[0]
        assert_close_to_reference(out, causal_out.double(), expected, name="attn_output")

    def test_requires_attn_mask(self):
        ours = fastattn.MultiheadAttention(E, H)
        x = torch.randn(self.L, 2, E)
        with pytest.raises(RuntimeError, match="attn_mask"):
            ours(x, x, x, is_causal=True, need_weights=False)


def _spy(monkeypatch) -> list[dict]:
    """Records the arguments of every call the module makes into fastattn's fused op."""
    calls: list[dict] = []
    real = attention_ops.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append(dict(q=q, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal))
        return real(q, k, v, attn_mask, dropout_p, is_causal, **kwargs)

    monkeypatch.setattr(attention_ops, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize(
    "kpm_kind,mask_kind,shape,dtype",
    [
        ("bool", None, (2, 1, 1, 5), torch.bool),
        (None, "bool2d", (1, 1, 7, 5), torch.bool),
        ("bool", "bool2d", (2, 1, 7, 5), torch.bool),
        ("float", "float2d", (2, 1, 7, 5), torch.float32),
        ("bool", "bool3d", (2, H, 7, 5), torch.bool),
    ],
)
def test_fused_path_gets_one_broadcastable_mask(monkeypatch, kpm_kind, mask_kind, shape, dtype):
    """The masks reach the op merged, in its convention, without per-head copies of 2-D ones."""
    calls = _spy(monkeypatch)
    ours = fastattn.MultiheadAttention(E, H)
    B, L, S = 2, 7, 5
    kpm, attn_mask = _mask(kpm_kind, B, L, S, True), _mask(mask_kind, B, L, S, False)
    q, k, v = _qkv(False, B, L, S)
    ours(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    (call,) = calls
    mask = call["attn_mask"]
    assert tuple(mask.shape) == shape and mask.dtype == dtype
    blocked = torch.zeros(B, H, L, S, dtype=torch.bool)
    if kpm is not None:
        blocked |= (kpm if kpm.dtype == torch.bool else kpm.isinf()).view(B, 1, 1, S)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask.isinf()
        blocked |= m.view(-1, H, L, S) if m.dim() == 3 else m
    visible = mask.expand(B, H, L, S) if dtype == torch.bool else mask.expand(B, H, L, S).isfinite()
    assert torch.equal(visible, ~blocked)


def test_fully_blocked_row_gives_zero_attention_on_fused_path():
    """The fused path attends to nothing there, as torch's module does in training (its eval
    fast path returns NaN: a documented difference)."""
    ours = fastattn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        ours.out_proj.bias.normal_()
    x = torch.randn(2, 4, E)
    attn_mask = torch.zeros(4, 4, dtype=torch.bool)
    attn_mask[1] = True  # query 1 may see no key
    out = ours(x, x, x, attn_mask=attn_mask, need_weights=False)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], ours.out_proj.bias.detach().expand(2, E))


class TestDropout:
    def test_fused_path_passes_dropout_in_training_only(self, monkeypatch):
        calls = _spy(monkeypatch)
        ours = fastattn.MultiheadAttention(E, H, dropout=0.25)
        x = torch.randn(5, 2, E)
        ours(x, x, x, need_weights=False)
        ours.eval()
        ours(x, x, x, need_weights=False)
        assert [c["dropout_p"] for c in calls] == [0.25, 0.0]

    def test_fused_path_dropout_is_the_ops_seeded_dropout(self):
        """Training output == fastattn's SDPA with dropout on the module's own projections,
        under the same torch seed; another seed drops other elements."""
        ours, _, _ = _modules(dropout=0.5, batch_first=True)
        x = torch.randn(2, 6, E)
        torch.manual_seed(3)
        out = ours(x, x, x, need_weights=False)[0]
        w, b = ours.in_proj_weight, ours.in_proj_bias
        q, k, v = (torch.nn.functional.linear(x, w_i, b_i).unflatten(-1, (H, -1)).transpose(1, 2)
                   for w_i, b_i in zip(w.chunk(3), b.chunk(3), strict=True))
        torch.manual_seed(3)
        heads = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        expected = ours.out_proj(heads.transpose(1, 2).flatten(-2))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.manual_seed(4)
        other = ours(x, x, x, need_weights=False)[0]
        assert not torch.allclose(out, other)
        assert not torch.allclose(out, ours.eval()(x, x, x, need_weights=False)[0])

    @pytest.mark.parametrize("batch_first", [False, True])
    def test_weights_path_matches_torch_with_the_same_seed(self, batch_first):
        ours, theirs, _ = _modules(dropout=0.3, batch_first=batch_first)
        q, k, v = _qkv(batch_first, 2, 7, 5)
        torch.manual_seed(7)
        out, w = ours(q, k, v, average_attn_weights=False)
        torch.manual_seed(7)
        out_t, w_t = theirs(q, k, v, average_attn_weights=False)
        torch.testing.assert_close(w, w_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-6)
        assert (w == 0).any()


@pytest.mark.parametrize(
    "flags",
    [dict(), dict(add_bias_kv=True, add_zero_attn=True), dict(kdim=10, vdim=6, bias=False)],
    ids=["default", "bias_kv", "kdim_vdim"],
)
def test_same_parameters_init_and_state_dict_as_torch(flags):
    torch.manual_seed(11)
    theirs = nn.MultiheadAttention(E, H, **flags)
    torch.manual_seed(11)
    ours = fastattn.MultiheadAttention(E, H, **flags)
    sd, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(sd_t)
    for name in sd:
        assert torch.equal(sd[name], sd_t[name]), f"{name} initialized differently from torch"
    assert type(ours.out_proj) is type(theirs.out_proj)
    # Loads both ways, strictly.
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    back = nn.MultiheadAttention(E, H, **flags)
    back.load_state_dict(ours.state_dict())
    for name, t in back.state_dict().items():
        assert torch.equal(t, sd_t[name]) and torch.equal(t, theirs.state_dict()[name])


def test_torch_attributes_are_mirrored():
    ours = fastattn.MultiheadAttention(E, H, dropout=0.1, kdim=10, batch_first=True)
    theirs = nn.MultiheadAttention(E, H, dropout=0.1, kdim=10, batch_first=True)
    for name in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim",
                 "add_zero_attn"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
    "call,error,match,torch_error",
    [
        (lambda m: m(torch.randn(3, 2, E + 1), torch.randn(3, 2, E), torch.randn(3, 2, E)),
         ValueError, "query must have 24 features", AssertionError),
        (lambda m: m(torch.randn(3, 2, E), torch.randn(4, 2, E), torch.randn(3, 2, E)),
         ValueError, "same length", AssertionError),
        (lambda m: m(torch.randn(3, 2, E), torch.randn(3, 2, E), torch.randn(3, 2, E),
                     attn_mask=torch.zeros(3, 4)), ValueError, "attn_mask must have shape",
         RuntimeError),
        (lambda m: m(torch.randn(3, 2, E), torch.randn(3, 2, E), torch.randn(3, 2, E),
                     key_padding_mask=torch.zeros(3, 2, dtype=torch.bool)),
         ValueError, "key_padding_mask must have shape", AssertionError),
        (lambda m: m(torch.randn(3, 2, E), torch.randn(3, 2, E), torch.randn(3, 2, E),
                     attn_mask=torch.zeros(3, 3, dtype=torch.int64)),
         TypeError, "bool or floating", AssertionError),
        (lambda m: m(torch.randn(3, E), torch.randn(3, 2, E), torch.randn(3, 2, E)),
         ValueError, "must be 2-D like query", AssertionError),
        (lambda m: m(torch.randn(3, 2, 1, E), torch.randn(3, 2, E), torch.randn(3, 2, E)),
         ValueError, "3-D .batched. or 2-D", AssertionError),
        (lambda m: m(torch.randn(3, 2, E), torch.randn(3, 3, E), torch.randn(3, 3, E)),
         ValueError, "share the batch size", RuntimeError),
    ],
    ids=["embed_dim", "kv_length", "mask_shape", "kpm_shape", "mask_dtype", "ranks", "query_rank",
         "batch"],
)
def test_bad_inputs_raise_clear_errors(call, error, match, torch_error):
    """Our error type and message, and whatever nn.MultiheadAttention raises for the same call
    (AssertionError where torch asserts): an ``except`` written for torch's module still works."""
    with pytest.raises(torch_error):
        call(nn.MultiheadAttention(E, H))
    with pytest.raises(error, match=match) as raised:
        call(fastattn.MultiheadAttention(E, H))
    assert isinstance(raised.value, torch_error)


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible") as raised:
        fastattn.MultiheadAttention(10, 3)
    assert isinstance(raised.value, AssertionError)  # what torch's constructor raises
    with pytest.raises(ValueError, match="greater than 0"):
        fastattn.MultiheadAttention(0, 1)


def test_pickle_deepcopy_and_to_dtype():
    ours, _, _ = _modules(batch_first=True, add_bias_kv=True)
    x = torch.randn(2, 5, E)
    expected = ours(x, x, x, need_weights=False)[0]
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours),
                  torch.load(buffer, weights_only=False)):
        assert type(clone) is fastattn.MultiheadAttention
        assert torch.equal(clone(x, x, x, need_weights=False)[0], expected)
    as64 = copy.deepcopy(ours).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in as64.parameters())
    out64 = as64(x.double(), x.double(), x.double(), need_weights=False)[0]
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sharing", ["self", "cross"])
def test_float32_vs_float64_with_projections_of_many_rows(sharing):
    """Projections of 66 rows (2 x 33): fastattn.ops.linear's op where its GEMM beats torch.mm's
    (AMD CPUs). The float32 output and every gradient (inputs and parameters) within 2x torch's
    own float32 error against float64: self-attention (one packed in-projection GEMM) and
    cross-attention (the q, k, v GEMMs)."""
    theirs64 = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    ours, theirs = fastattn.MultiheadAttention(E, H, batch_first=True), nn.MultiheadAttention(
        E, H, batch_first=True)
    ours.load_state_dict(theirs64.state_dict())
    theirs.load_state_dict(theirs64.state_dict())
    q64 = torch.randn(2, 33, E, dtype=torch.float64)
    kv64 = q64 if sharing == "self" else torch.randn(2, 40, E, dtype=torch.float64)
    results = {}
    for key, module, dtype in (("64", theirs64, torch.float64), ("ours", ours, torch.float32),
                               ("torch", theirs, torch.float32)):
        q = q64.to(dtype).requires_grad_()
        kv = q if sharing == "self" else kv64.to(dtype).requires_grad_()
        out, _ = module(q, kv, kv, need_weights=False)
        leaves = [q] + ([] if sharing == "self" else [kv]) + list(module.parameters())
        results[key] = [out, *torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel(),
                                                  dtype=dtype).view(out.shape))]
    names = ["output", "grad q"] + ([] if sharing == "self" else ["grad kv"]) + [
        f"grad {n}" for n, _ in ours.named_parameters()]
    for name, a, r, t in zip(names, results["ours"], results["64"], results["torch"], strict=True):
        assert_close_to_reference(a, r, t, name=name)
