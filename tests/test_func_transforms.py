"""torch.func transforms over fastattn's differentiable ops, as over torch's own: grad, vjp,
jacrev and vmap give torch's results; double differentiation and forward-mode AD (first-order
reverse-mode formulas only) raise clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import fastattn

pytestmark = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built")
F64 = torch.float64


@pytest.fixture(autouse=True)
def _cpu_backend():
    with fastattn.use_backend("cpu"):
        yield


def _qkv(B=2, Hq=4, Hk=2, L=7, S=9, E=8, Ev=5):
    return (torch.randn(B, Hq, L, E, dtype=F64), torch.randn(B, Hk, S, E, dtype=F64),
            torch.randn(B, Hk, S, Ev, dtype=F64))


def _assert_trees_close(ours, theirs):
    for a, b in zip(torch.utils._pytree.tree_leaves(ours),
                    torch.utils._pytree.tree_leaves(theirs), strict=True):
        torch.testing.assert_close(a, b)


SDPA_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"is_causal": True}, id="causal"),
    pytest.param({"attn_mask": "bool"}, id="bool-mask"),
]


def _sdpa_options(options, L, S):
    if options.get("attn_mask") == "bool":
        return {"attn_mask": torch.rand(L, S) > 0.3}
    return options


@pytest.mark.parametrize("options", SDPA_CASES)
def test_sdpa_grad_matches_torch(options):
    q, k, v = _qkv()
    opts = _sdpa_options(options, q.shape[-2], k.shape[-2])
    w = torch.randn(*q.shape[:-1], v.shape[-1], dtype=F64)  # a random cotangent

    def loss(sdpa):
        return lambda q, k, v: (sdpa(q, k, v, enable_gqa=True, **opts) * w).sum()

    ours = grad(loss(fastattn.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    theirs = grad(loss(F.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    _assert_trees_close(ours, theirs)


def test_sdpa_float_mask_grad_matches_torch():
    q, k, v = _qkv(Hk=4)
    mask = torch.randn(q.shape[-2], k.shape[-2], dtype=F64)

    def loss(sdpa):
        return lambda mask: sdpa(q, k, v, attn_mask=mask).square().sum()

    ours = grad(loss(fastattn.scaled_dot_product_attention))(mask)
    # The op's mask gradient is accumulated in float32 (fastattn::attention_bwd's schema).
    torch.testing.assert_close(ours, grad(loss(F.scaled_dot_product_attention))(mask),
                               rtol=1e-5, atol=1e-6)


def test_sdpa_vmap_jacrev_and_vmap_of_grad_match_torch():
    q, k, v = _qkv(B=3, Hk=4, L=5, S=6, E=4, Ev=3)
    for transform in (
        lambda sdpa: vmap(sdpa)(q, k, v),
        lambda sdpa: jacrev(sdpa, argnums=(0, 1, 2))(q[0, 0], k[0, 0], v[0, 0]),
        lambda sdpa: vmap(grad(lambda q, k, v: sdpa(q, k, v).sin().sum(), argnums=(0, 1, 2)))(
            q, k, v),
    ):
        _assert_trees_close(transform(fastattn.scaled_dot_product_attention),
                            transform(F.scaled_dot_product_attention))


def test_attention_and_varlen_grad_match_autograd():
    # FlashAttention's options have no torch counterpart: torch.func.grad against the same call
    # differentiated by ordinary autograd.
    q, k, v = _qkv()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = [t.transpose(1, 2).reshape(-1, *t.shape[1:2], t.shape[-1])[:7] for t in (q, k, v)]
    calls = [
        (lambda q, k, v: fastattn.attention(q, k, v, causal=True, causal_align="bottom_right",
                                            window=(3, -1), softcap=2.0), (q, k, v)),
        (lambda q, k, v: fastattn.attention_varlen(q, k, v, cu, cu, 4, 4, causal=True), packed),
    ]
    for fn, inputs in calls:
        w = torch.randn_like(fn(*inputs))
        ours = grad(lambda *t, fn=fn, w=w: (fn(*t) * w).sum(), argnums=(0, 1, 2))(*inputs)
        leaves = [t.clone().requires_grad_() for t in inputs]
        _assert_trees_close(ours, torch.autograd.grad((fn(*leaves) * w).sum(), leaves))


def test_mha_parameter_grad_matches_torch():
    ours_mha = fastattn.MultiheadAttention(8, 2, batch_first=True).to(F64)
    torch_mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).to(F64)
    torch_mha.load_state_dict(ours_mha.state_dict())
    x = torch.randn(2, 5, 8, dtype=F64)

    def loss(module):
        def f(params):
            out, _ = functional_call(module, params, (x, x, x), {"need_weights": False})
            return out.sin().sum()
        return f

    _assert_trees_close(grad(loss(ours_mha))(dict(ours_mha.named_parameters())),
                        grad(loss(torch_mha))(dict(torch_mha.named_parameters())))


LSTM_CASES = [
    pytest.param(lambda: (fastattn.LSTMCell(3, 5), torch.nn.LSTMCell(3, 5)),
                 lambda: torch.randn(2, 3, dtype=F64), id="LSTMCell"),
    pytest.param(lambda: (fastattn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True),
                          torch.nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True)),
                 lambda: torch.randn(4, 2, 3, dtype=F64), id="LSTM-proj-bidirectional"),
]


@pytest.mark.parametrize("make_modules,make_x", LSTM_CASES)
def test_lstm_grad_matches_torch(make_modules, make_x):
    ours, theirs = (m.to(F64) for m in make_modules())
    theirs.load_state_dict(ours.state_dict())
    x = make_x()

    def loss(module):
        def f(params, x):
            out, _ = functional_call(module, params, (x,))
            return out.sin().sum()
        return f

    _assert_trees_close(grad(loss(ours), argnums=(0, 1))(dict(ours.named_parameters()), x),
                        grad(loss(theirs), argnums=(0, 1))(dict(theirs.named_parameters()), x))


def test_layer_norm_lstm_grad_matches_autograd():
    lstm = fastattn.LSTM(3, 5, layer_norm=True).to(F64)
    x = torch.randn(4, 2, 3, dtype=F64)
    params = dict(lstm.named_parameters())

    def loss(params, x):
        return functional_call(lstm, params, (x,))[0].sin().sum()

    ours = grad(loss, argnums=(0, 1))(params, x)
    x_leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(params, x_leaf), (*params.values(), x_leaf))
    _assert_trees_close((list(ours[0].values()), ours[1]), (list(expected[:-1]), expected[-1]))


@pytest.mark.parametrize("make_fn", [
    pytest.param(lambda: lambda q: fastattn.scaled_dot_product_attention(q, q, q), id="attention"),
    pytest.param(lambda: fastattn.LSTMCell(8, 2).to(F64), id="LSTMCell"),
])
def test_unsupported_transforms_raise_clearly(make_fn):
    f, q = make_fn(), torch.randn(3, 8, dtype=F64)

    def fn(q):
        out = f(q)
        return out[0] if isinstance(out, tuple) else out

    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad(lambda q: grad(lambda q: fn(q).sin().sum())(q).sum())(q)
    with pytest.raises(NotImplementedError, match="jvp"):
        jacfwd(fn)(q)
