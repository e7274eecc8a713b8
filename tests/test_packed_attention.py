"""attention_varlen against the per-sequence (padded-equivalent) computation, and
attention_with_kv_cache against full attention over the same prefix."""

import pytest
import torch
from helpers import assert_close_to_reference, attention_grad_scales, max_rel_error

import fastattn

BACKENDS = ["reference", pytest.param("cpu", id="cpu")]


def require(backend):
    status = fastattn.backends()[backend]
    if not status.usable:
        pytest.skip(f"backend {backend} unavailable here: {status.reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(), id="plain"),
        pytest.param(dict(causal=True, causal_align="bottom_right"), id="causal-br"),
        pytest.param(dict(window=(4, 0), softcap=3.0), id="window-softcap"),
    ],
)
def test_varlen_matches_per_sequence_float64(backend, dtype, options):
    """Output, LSE and the gradients of q, k, v against float64 attention run on each sequence
    alone (GQA, ALiBi, odd lengths, a one-query sequence)."""
    require(backend)
    lens_q, lens_k = [1, 7, 33, 12], [5, 7, 40, 12]
    offsets_q = [0, *torch.tensor(lens_q).cumsum(0).tolist()]
    offsets_k = [0, *torch.tensor(lens_k).cumsum(0).tolist()]
    cu_q, cu_k = (torch.tensor(o, dtype=torch.int32) for o in (offsets_q, offsets_k))
    q = torch.randn(sum(lens_q), 4, 32, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 32, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 16, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(sum(lens_q), 4, 16, dtype=dtype)
    slopes = torch.rand(len(lens_q), 4)
    with fastattn.use_backend(backend):
        out, lse = fastattn.attention_varlen(
            q, k, v, cu_q, cu_k, 33, 40, alibi_slopes=slopes, return_lse=True, **options
        )
    assert out.shape == (sum(lens_q), 4, 16) and lse.shape == (4, sum(lens_q))
    out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    refs, ref_lses = [], []
    for i in range(len(lens_q)):
        qi = q64[offsets_q[i] : offsets_q[i + 1]].transpose(0, 1)[None]
        ki, vi = (t[offsets_k[i] : offsets_k[i + 1]].transpose(0, 1)[None] for t in (k64, v64))
        with fastattn.use_backend("reference"):
            ref, ref_lse = fastattn.attention(
                qi, ki, vi, alibi_slopes=slopes[i], return_lse=True, **options
            )
        refs.append(ref[0].transpose(0, 1))
        ref_lses.append(ref_lse[0])
    ref = torch.cat(refs)
    ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, dtype=dtype, name="out")
    assert_close_to_reference(lse, torch.cat(ref_lses, dim=-1), dtype=torch.float32, name="lse")
    floors = attention_grad_scales(q.transpose(0, 1), k.transpose(0, 1), v, grad_out)
    for name, ours, theirs in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_to_reference(ours.grad, theirs.grad, dtype=dtype, name=name,
                                  scale_floor=floors.get(name, 0.0))


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda cu: cu.to(torch.int64), "int32"),
        (lambda cu: cu.flip(0), "non-decreasing"),
        (lambda cu: cu - torch.tensor([0, 0, 1], dtype=torch.int32), "total token count"),
        (lambda cu: torch.cat([cu, cu[-1:]]), "batch \\+ 1"),
    ],
)
def test_varlen_rejects_bad_cu_seqlens(bad, message):
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match=message):
        fastattn.attention_varlen(q, q, q, cu, bad(cu), 5, 5)


def test_varlen_rejects_too_small_max_seqlen():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="max_seqlen"):
        fastattn.attention_varlen(q, q, q, cu, cu, 4, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L_new", [1, 3])
def test_kv_cache_decode_matches_full_attention_over_prefix(backend, L_new):
    require(backend)
    B, Hq, Hk, S_max, E = 3, 4, 2, 40, 32
    lengths = [0, 17, 36]
    k_cache = torch.randn(B, Hk, S_max, E)
    v_cache = torch.randn(B, Hk, S_max, E)
    k_new, v_new = torch.randn(B, Hk, L_new, E), torch.randn(B, Hk, L_new, E)
    q = torch.randn(B, Hq, L_new, E)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    before = k_cache.clone()
    with fastattn.use_backend(backend):
        out = fastattn.attention_with_kv_cache(
            q, k_cache, v_cache, seqlens, k_new, v_new, causal=True
        )
    for b, n in enumerate(lengths):
        assert torch.equal(k_cache[b, :, n : n + L_new], k_new[b]), "k_new not appended in place"
        assert torch.equal(k_cache[b, :, :n], before[b, :, :n]), "valid prefix overwritten"
        keys = torch.cat([before[b : b + 1, :, :n], k_new[b : b + 1]], dim=2)
        values = v_cache[b : b + 1, :, : n + L_new]
        with fastattn.use_backend("reference"):
            ref = fastattn.attention(
                q[b : b + 1], keys, values, causal=True, causal_align="bottom_right"
            )
        assert max_rel_error(out[b : b + 1], ref) < 1e-5


def test_kv_cache_rejects_overflow_and_bad_seqlens():
    k = torch.randn(2, 1, 8, 16)
    q = torch.randn(2, 1, 1, 16)
    with pytest.raises(ValueError, match="int32"):
        fastattn.attention_with_kv_cache(q, k, k, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cache_seqlens \\+ L_new"):
        fastattn.attention_with_kv_cache(
            q,
            k,
            k,
            torch.tensor([8, 2], dtype=torch.int32),
            torch.randn(2, 1, 1, 16),
            torch.randn(2, 1, 1, 16),
        )
