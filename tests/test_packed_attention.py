"""attention_varlen against the per-sequence (padded-equivalent) computation, and
attention_with_kv_cache against full attention over the same prefix."""

import pytest
import torch
from helpers import max_rel_error

import fastattn

BACKENDS = ["reference", pytest.param("cpu", id="cpu")]


def require(backend):
    status = fastattn.backends()[backend]
    if not status.usable:
        pytest.skip(f"backend {backend} unavailable here: {status.reason}")


def padded(x: torch.Tensor, offsets: list[int], length: int) -> torch.Tensor:
    """[total, H, D] -> [batch, H, length, D] zero-padded, for the padded equivalent."""
    out = x.new_zeros(len(offsets) - 1, x.shape[1], length, x.shape[2])
    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
        out[i, :, : b - a] = x[a:b].transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(), id="plain"),
        pytest.param(dict(causal=True, causal_align="bottom_right"), id="causal-br"),
        pytest.param(dict(window=(4, 0), softcap=3.0), id="window-softcap"),
    ],
)
def test_varlen_matches_padded_equivalent(backend, options):
    require(backend)
    lens_q, lens_k = [1, 7, 33, 12], [5, 7, 40, 12]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 16, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(len(lens_q), 4)
    with fastattn.use_backend(backend):
        out, lse = fastattn.attention_varlen(
            q, k, v, cu_q, cu_k, 33, 40, alibi_slopes=slopes, return_lse=True, **options
        )
    assert out.shape == (sum(lens_q), 4, 16) and lse.shape == (4, sum(lens_q))
    out.sum().backward()
    qp, kp, vp = (
        padded(q, cu_q.tolist(), 33),
        padded(k, cu_k.tolist(), 40),
        padded(v, cu_k.tolist(), 40),
    )
    for i, (a, b) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:])):
        Li, Si = lens_q[i], lens_k[i]
        with fastattn.use_backend("reference"):
            ref = fastattn.attention(
                qp[i : i + 1, :, :Li],
                kp[i : i + 1, :, :Si],
                vp[i : i + 1, :, :Si],
                alibi_slopes=slopes[i],
                **options,
            )
        assert max_rel_error(out[a:b], ref[0].transpose(0, 1)) < 1e-10
    assert (
        torch.isfinite(q.grad).all()
        and torch.isfinite(k.grad).all()
        and torch.isfinite(v.grad).all()
    )


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
