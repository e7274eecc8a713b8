"""NaN in q, k or v reaches the output and the gradients exactly where it does in torch, on every
backend: the "a row that sees no key returns zeros" rule must not swallow it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ATTENTION_BACKENDS, device_for, require
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn

BACKENDS = ATTENTION_BACKENDS
NAN = float("nan")


def _require(backend: str, dtype: torch.dtype, E: int) -> str:
    require(backend, dtype, E)
    return device_for(backend)


def _poison_all_q(q, k, v):
    q.fill_(NAN)


def _poison_q_row(q, k, v):
    q[0, 1, 3, 5] = NAN


def _poison_k(q, k, v):
    k[0, 0, 4, 2] = NAN


def _poison_v(q, k, v):
    v[0, 1, 2, 7] = NAN


POISONS = [
    pytest.param(_poison_all_q, id="all-q"),
    pytest.param(_poison_q_row, id="q-element"),
    pytest.param(_poison_k, id="k-element"),
    pytest.param(_poison_v, id="v-element"),
]


def _run(fn, q, k, v, grad_out, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", POISONS)
# L = 1 with many keys: the CPU kernel's decode path, which splits the keys across threads and
# merges the parts by their LSE.
@pytest.mark.parametrize("L,S", [(7, 9), (1, 300)], ids=["L7-S9", "L1-S300"])
def test_nan_inputs_give_nan_where_torch_does(backend, poison, L, S):
    device = _require(backend, torch.float32, 16)
    q, k, v = (torch.randn(1, 2, n, 16, device=device) for n in (L, S, S))
    if L == 1 and poison is _poison_q_row:
        pytest.skip("the single query row is covered by all-q")
    poison(q, k, v)
    grad_out = torch.randn(1, 2, L, 16, device=device)
    with fastattn.use_backend(backend):
        ours = _run(fastattn.scaled_dot_product_attention, q, k, v, grad_out)
    # Without masks torch's math and fused CPU kernels agree on where NaN goes; with masks they
    # do not (the math kernel adds the mask as -inf, keeping masked NaN scores).
    with sdpa_kernel(SDPBackend.MATH):
        theirs = _run(F.scaled_dot_product_attention, q, k, v, grad_out)
    assert theirs[0].isnan().any()
    for name, a, t in zip(("out", "dq", "dk", "dv"), ours, theirs):
        same_nans = torch.equal(a.isnan(), t.isnan())
        assert same_nans, f"{name}: NaN at {a.isnan().sum()} places, torch has {t.isnan().sum()}"
        finite = ~t.isnan()
        torch.testing.assert_close(a[finite], t[finite], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", POISONS)
# bf16: the CPU kernel's softmax writes bf16 probabilities as it takes their exp.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_reaches_exactly_the_rows_that_see_it_under_a_causal_mask(backend, poison, dtype):
    # A masked score is -inf whatever q and k hold, so a NaN reaches the rows that can see it:
    # the float64 reference's rule, which every backend must follow.
    device = _require(backend, dtype, 16)
    q, k, v = (torch.randn(1, 2, 6, 16, device=device, dtype=dtype) for _ in range(3))
    poison(q, k, v)
    grad_out = torch.randn(1, 2, 6, 16, device=device, dtype=dtype)
    with fastattn.use_backend(backend):
        ours = _run(fastattn.scaled_dot_product_attention, q, k, v, grad_out, is_causal=True)
    with fastattn.use_backend("reference"):
        ref = _run(fastattn.scaled_dot_product_attention, *(t.double() for t in (q, k, v)),
                   grad_out.double(), is_causal=True)
    assert ref[0].isnan().any() and not ref[0].isnan().all() or poison is _poison_all_q
    for name, a, r in zip(("out", "dq"), ours[:2], ref[:2]):
        same_nans = torch.equal(a.isnan(), r.isnan())
        assert same_nans, f"{name}: NaN at {a.isnan().sum()} places, reference {r.isnan().sum()}"
    assert ours[2].isnan().any(), "dk: the NaN did not reach it"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_gives_nan_lse_and_fully_masked_row_stays_zero(backend):
    device = _require(backend, torch.float32, 16)
    q, k, v = (torch.randn(1, 1, 4, 16, device=device) for _ in range(3))
    q[0, 0, 1] = NAN  # row 1: NaN
    q[0, 0, 2] = NAN  # row 2: NaN, but it sees no key: the zero-row rule applies
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device)
    mask[0, 0, 2] = False
    with fastattn.use_backend(backend):
        out, lse = fastattn.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert out[0, 0, 1].isnan().all() and lse[0, 0, 1].isnan()
    assert torch.equal(out[0, 0, 2], torch.zeros_like(out[0, 0, 2]))
    assert lse[0, 0, 2] == float("-inf")
    assert torch.isfinite(out[0, 0, [0, 3]]).all() and torch.isfinite(lse[0, 0, [0, 3]]).all()
