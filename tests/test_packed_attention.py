"""attention_varlen and attention_with_kv_cache (one fused op each) against float64 attention run
on each sequence alone; their value checks, "nothing written on error", opcheck of the three ops
and torch.compile (fullgraph, no recompile per decode step)."""

import contextlib

import pytest
import torch
from helpers import assert_close_to_reference, attention_grad_scales, nan_heap, randn

import fastattn
from fastattn.ops import reference

BACKENDS = ["reference", "cpu"]
OPS = torch.ops.fastattn


def require(backend):
    status = fastattn.backends()[backend]
    if not status.usable:
        pytest.skip(f"backend {backend} unavailable here: {status.reason}")


@contextlib.contextmanager
def thread_pool(n):
    """n intra-op threads: the kernels' multi-threaded paths (split-KV decode, varlen's
    dynamic scheduling) need a pool, whatever the machine running the tests has."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def tokens(total, heads, dim, dtype):
    """[total, heads, dim] with strided tokens and heads (a slice of a wider buffer)."""
    return randn(total, heads, dim + 3, dtype=dtype)[..., 1 : dim + 1]


def varlen_reference64(q, k, v, lens_q, lens_k, alibi, opts, keep=None):
    """out [total_q, Hq, Ev], lse [Hq, total_q] from reference.attention_reference in float64 on
    each sequence (differentiable in q, k, v); keep: the packed dropout keep mask [Hq, total_q,
    max_k] or None."""
    cu_q, cu_k = cumulative(lens_q).tolist(), cumulative(lens_k).tolist()
    outs, lses = [], []
    for b in range(len(lens_q)):
        qb, kb, vb = (t.transpose(0, 1)[None].double() for t in (
            q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]))
        slopes = alibi[b] if alibi is not None and alibi.dim() == 2 else alibi
        keep_b = None if keep is None else keep[None, :, cu_q[b] : cu_q[b + 1], : lens_k[b]]
        out, lse = reference.attention_reference(
            qb, kb, vb, None, slopes, opts.get("dropout_p", 0.0), None, opts["scale"],
            *opts["window"], opts["bottom_right"], opts.get("softcap", 0.0), dropout_keep=keep_b)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


# Lengths: an empty sequence, one token, odd sizes, one longer than two 64-row tiles (enough work
# for the kernels to use their thread pool), and an empty key side under a non-empty query (its
# rows see no key: zeros, lse -inf).
LENS_Q = [0, 1, 7, 130, 12, 3]
LENS_K = [5, 1, 9, 66, 12, 0]
VARLEN_OPTIONS = [
    pytest.param(dict(), dict(window=(-1, -1), bottom_right=False), id="plain"),
    pytest.param(dict(causal=True), dict(window=(-1, 0), bottom_right=False), id="causal-tl"),
    pytest.param(dict(causal=True, causal_align="bottom_right"),
                 dict(window=(-1, 0), bottom_right=True), id="causal-br"),
    pytest.param(dict(window=(4, 2), softcap=3.0, causal_align="bottom_right"),
                 dict(window=(4, 2), bottom_right=True, softcap=3.0), id="window-softcap"),
]


# The cpu kernels in every option and dtype; the reference backend (the fallback of a device
# without a fused kernel) in one.
VARLEN_CASES = [
    pytest.param("cpu", dtype, *option.values, id=f"cpu-{dtype_id}-{option.id}")
    for dtype, dtype_id in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for option in VARLEN_OPTIONS
] + [pytest.param("reference", torch.float32, *VARLEN_OPTIONS[2].values,
                  id="reference-fp32-causal-br")]


def check_varlen_against_float64(backend, dtype, options, ref_options, lens_q, lens_k,
                                 threads):
    """Output, LSE and the gradients of q, k, v (GQA, ALiBi [B, Hq], strided inputs, out poisoned
    with NaN beforehand) against float64 attention on each sequence; returns lse."""
    torch.manual_seed(0)
    Hq, Hk, E, Ev = 4, 2, 40, 24
    q = tokens(sum(lens_q), Hq, E, dtype).requires_grad_()
    k = tokens(sum(lens_k), Hk, E, dtype).requires_grad_()
    v = tokens(sum(lens_k), Hk, Ev, dtype).requires_grad_()
    grad_out = randn(sum(lens_q), Hq, Ev, dtype=dtype)
    slopes = torch.rand(len(lens_q), Hq)
    nan_heap((sum(lens_q), Hq, Ev), dtype=dtype)
    with fastattn.use_backend(backend), thread_pool(threads):
        out, lse = fastattn.attention_varlen(
            q, k, v, cumulative(lens_q), cumulative(lens_k), max(lens_q), max(lens_k),
            alibi_slopes=slopes, return_lse=True, **options)
        assert out.shape == (sum(lens_q), Hq, Ev) and out.dtype == dtype
        assert out.is_contiguous() and lse.shape == (Hq, sum(lens_q))
        assert lse.dtype == torch.float32
        out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = varlen_reference64(q64, k64, v64, lens_q, lens_k, slopes,
                                      dict(scale=E**-0.5, **ref_options))
    ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, dtype=dtype, name="out")
    assert_close_to_reference(lse, ref_lse, dtype=torch.float32, name="lse")
    floors = attention_grad_scales(q.transpose(0, 1), k.transpose(0, 1), v, grad_out)
    for name, ours, theirs in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_to_reference(ours.grad, theirs.grad, dtype=dtype, name=name,
                                  scale_floor=floors.get(name, 0.0))
    return lse


@pytest.mark.parametrize("backend,dtype,options,ref_options", VARLEN_CASES)
def test_varlen_matches_per_sequence_float64(backend, dtype, options, ref_options):
    require(backend)
    lse = check_varlen_against_float64(backend, dtype, options, ref_options, LENS_Q, LENS_K, 4)
    assert torch.isneginf(lse[:, -3:]).all(), "rows of the keyless sequence must have lse -inf"


# Tiles that a causal or right window edge cuts, whose products skip what no row sees: lengths
# just past the 64-row and 64-key tiles and below one vector pair, queries longer and shorter
# than the keys (bottom-right shifts the diagonal both ways), every dtype.
DIAGONAL_LENS_Q = [33, 65, 129, 0, 1, 7]
DIAGONAL_LENS_K = [33, 70, 100, 3, 1, 65]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp16", "fp64", "fp32", "bf16"])
@pytest.mark.parametrize("options,ref_options", [
    pytest.param(dict(causal=True), dict(window=(-1, 0), bottom_right=False), id="causal-tl"),
    pytest.param(dict(causal=True, causal_align="bottom_right"),
                 dict(window=(-1, 0), bottom_right=True), id="causal-br"),
    pytest.param(dict(window=(9, 3)), dict(window=(9, 3), bottom_right=False), id="window"),
])
def test_varlen_diagonal_tiles_match_float64(dtype, options, ref_options):
    require("cpu")
    check_varlen_against_float64("cpu", dtype, options, ref_options, DIAGONAL_LENS_Q,
                                 DIAGONAL_LENS_K, 2)


# The cpu kernels run a sequence whose rows fit in L2 as one unit of all its heads, read in
# address order first, and a longer one head by head (varlen_units in attention_cpu.isa.cpp).
# At Hq 16, Hk 8, E 64, Ev 32, fp32 a token takes 7 KiB of q, k and v (9 KiB with dO in the
# backward): 300 tokens exceed every L2 of our CPUs (512 KiB - 2 MiB), 17 fit in each. The warm
# reads follow the layout: token by token (token-major) or head by head (head-major).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["token-major", "head-major"])
def test_varlen_short_and_long_sequences_match_float64(layout, threads):
    require("cpu")
    torch.manual_seed(0)
    lens, Hq, Hk, E, Ev = [17, 300, 0, 1, 3, 17], 16, 8, 64, 32

    def packed(heads, dim):
        if layout == "head-major":
            return randn(heads, sum(lens), dim, dtype=torch.float32).transpose(0, 1)
        return randn(sum(lens), heads, dim, dtype=torch.float32)

    q, k, v = packed(Hq, E), packed(Hk, E), packed(Hk, Ev)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = randn(sum(lens), Hq, Ev, dtype=torch.float32)
    nan_heap((sum(lens), Hq, Ev), dtype=torch.float32)
    with fastattn.use_backend("cpu"), thread_pool(threads):
        out = fastattn.attention_varlen(q, k, v, cumulative(lens), cumulative(lens), max(lens),
                                        max(lens), causal=True)
        out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_reference64(q64, k64, v64, lens, lens, None,
                                dict(scale=E**-0.5, window=(-1, 0), bottom_right=False))
    ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, dtype=torch.float32, name="out")
    floors = attention_grad_scales(q.transpose(0, 1), k.transpose(0, 1), v, grad_out)
    for name, ours, theirs in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_to_reference(ours.grad, theirs.grad, dtype=torch.float32, name=name,
                                  scale_floor=floors.get(name, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_dropout_uses_the_packed_counter(backend):
    """The keep mask of element (b, h, i, j) is reference.dropout_keep_mask's bit at
    ((h * total_q) + cu_seqlens_q[b] + i) * max_seqlen_k + j, bit-exact (float64: one flipped
    bit would move the output far past the tolerance), forward and backward."""
    require(backend)
    # p = 0.375 is exact in float32, the kernels' dropout_p type: the scales agree to the last bit.
    lens_q, lens_k, Hq, Hk, E, p = [3, 0, 9, 5], [4, 2, 11, 1], 2, 1, 16, 0.375
    q = randn(sum(lens_q), Hq, E, dtype=torch.float64).requires_grad_()
    k = randn(sum(lens_k), Hk, E, dtype=torch.float64).requires_grad_()
    v = randn(sum(lens_k), Hk, E, dtype=torch.float64).requires_grad_()
    max_k = max(lens_k) + 2  # a bound above the longest sequence: the counter uses it as given
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(7)
    with fastattn.use_backend(backend):
        out = fastattn.attention_varlen(q, k, v, cumulative(lens_q), cumulative(lens_k),
                                        max(lens_q), max_k, dropout_p=p, causal=True)
    grad_out = randn(*out.shape, dtype=torch.float64)
    out.backward(grad_out)
    keep = reference.dropout_keep_mask(seed, (1, Hq, sum(lens_q), max_k), p, q.device)[0]
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_reference64(q64, k64, v64, lens_q, lens_k, None,
                                dict(scale=E**-0.5, window=(-1, 0), bottom_right=False,
                                     dropout_p=p), keep=keep)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-9)


def test_varlen_nan_stays_in_its_row_and_sequence():
    """A NaN query gives a NaN output row, a NaN key NaN rows of its own sequence only, as
    attention_fwd (and torch) do; the other sequences stay finite."""
    require("cpu")
    lens = [4, 6, 5]
    q, k, v = (randn(15, 2, 8) for _ in range(3))
    q[4, 0, 3] = float("nan")  # sequence 1, row 0, head 0
    k[12, 1, 0] = float("nan")  # sequence 2, key 2, head 1
    cu = cumulative(lens)
    with fastattn.use_backend("cpu"):
        out = fastattn.attention_varlen(q, k, v, cu, cu, 6, 6)
    nan_rows = out.isnan().any(-1)  # [15, 2]
    expected = torch.zeros(15, 2, dtype=torch.bool)
    expected[4, 0] = True
    expected[10:, 1] = True
    assert torch.equal(nan_rows, expected)


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda cu: cu.to(torch.int64), "int32"),
        (lambda cu: cu.flip(0), "start at 0"),
        (lambda cu: torch.tensor([0, 6, 5, 8], dtype=torch.int32), "non-decreasing"),
        (lambda cu: cu - torch.tensor([0, 0, 0, 1], dtype=torch.int32), "total token count"),
        (lambda cu: torch.cat([cu, cu[-1:]]), "batch \\+ 1"),
        (lambda cu: torch.tensor([0, 1, 7, 8], dtype=torch.int32), "max_seqlen_k"),
    ],
)
def test_varlen_rejects_bad_cu_seqlens(bad, message):
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match=message):
        fastattn.attention_varlen(q, q, q, cu, bad(cu), 5, 5)


@pytest.mark.parametrize("check_values", [True, False], ids=["checks-on", "checks-off"])
@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda cu: cu.to(torch.int64), "1-D int32"),
        (lambda cu: cu[None], "1-D int32"),
        (lambda cu: cu.to("meta"), "is on meta"),
        (lambda cu: cu - 1, "must start at 0"),
        (lambda cu: torch.tensor([0, -1, 5, 8], dtype=torch.int32), "non-decreasing"),
        (lambda cu: torch.tensor([0, 6, 5, 8], dtype=torch.int32), "non-decreasing"),
        (lambda cu: torch.tensor([0, 3, 5, 7], dtype=torch.int32), "total token count 8"),
        (lambda cu: torch.tensor([0, 1, 7, 8], dtype=torch.int32), "max_seqlen"),
    ],
    ids=["int64", "2-D", "meta", "first", "negative", "decreasing", "last", "too-long"],
)
def test_varlen_cpu_op_rejects_bad_cu_seqlens(bad, message, name, check_values):
    """On CPU tensors the C++ op alone checks the offsets' values (the Python check is skipped,
    check_values or not); its errors read as the Python checks': FastattnValueError (a
    ValueError and a RuntimeError) naming the offsets."""
    require("cpu")
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    q = torch.randn(8, 2, 16)
    offsets = {"cu_seqlens_q": cu, "cu_seqlens_k": cu, name: bad(cu)}
    with fastattn.use_backend("cpu"), pytest.raises(ValueError, match=message) as caught:
        fastattn.attention_varlen(q, q, q, offsets["cu_seqlens_q"], offsets["cu_seqlens_k"], 5,
                                  5, check_values=check_values)
    assert isinstance(caught.value, RuntimeError)
    assert name in str(caught.value)


# ---- KV cache ----------------------------------------------------------------------------------


def make_cache(layout, B, Hk, E, Ev, capacity, block_size, dtype, generator):
    """(k_cache, v_cache, block_table or None, cache_batch_idx or None) of a cache holding at
    least ``capacity`` positions per sequence, filled with random values."""
    if layout == "contiguous":
        n = B + 2
        k, v = randn(n, Hk, capacity, E, dtype=dtype), randn(n, Hk, capacity, Ev, dtype=dtype)
        batch_idx = torch.randperm(n, generator=generator)[:B].to(torch.int32)
        return k, v, None, batch_idx
    max_blocks = -(-capacity // block_size)
    n = B * max_blocks + 3
    table = torch.randperm(n, generator=generator)[: B * max_blocks].reshape(B, max_blocks)
    if layout == "paged-vllm":  # [num_blocks, block_size, Hk, D] viewed as [.., Hk, block, D]
        k = randn(n, block_size, Hk, E, dtype=dtype).transpose(1, 2)
        v = randn(n, block_size, Hk, Ev, dtype=dtype).transpose(1, 2)
    else:
        k, v = randn(n, Hk, block_size, E, dtype=dtype), randn(n, Hk, block_size, Ev, dtype=dtype)
    return k, v, table.to(torch.int32), None


def cached_keys(cache, b, length, block_table, batch_idx):
    """[Hk, length, D] positions 0 .. length - 1 of sequence b."""
    index, row = reference.kv_cache_positions(cache, b, length, block_table, batch_idx)
    return cache[index, :, row].transpose(0, 1)


KV_CASES = [
    # layout, B, Hq, Hk, Lq, L_new, lengths, block_size, options
    pytest.param("contiguous", 3, 4, 2, 1, 1, [0, 17, 70], None, dict(causal=True),
                 id="contiguous-batch-idx-decode"),
    pytest.param("paged", 4, 4, 1, 3, 3, [0, 1, 37, 70], 16,
                 dict(causal=True, window=(20, 0), softcap=5.0, alibi=True),
                 id="paged-shuffled-window-softcap-alibi"),
    pytest.param("paged-vllm", 3, 2, 2, 2, 0, [2, 45, 9], 12, dict(causal=True),
                 id="paged-vllm-layout-no-append"),
    pytest.param("paged-vllm", 2, 4, 2, 2, 2, [11, 30], 12, dict(causal=True),
                 id="paged-vllm-layout-append"),
    # Few heads, one query, 5k keys: the kernel splits the keys over threads (4 here).
    pytest.param("paged", 1, 2, 1, 1, 1, [4999], 16, dict(), id="paged-split-kv-long-context"),
    # One query row: key tiles span pages, read a page's run at a time; pages of 5 and 12 rows
    # start runs mid-vector, and the runs end mid-page where a sequence ends.
    pytest.param("paged", 3, 4, 2, 1, 1, [0, 23, 70], 5,
                 dict(causal=True, window=(30, 0), softcap=5.0, alibi=True),
                 id="paged-decode-odd-pages-window-softcap-alibi"),
    pytest.param("paged-vllm", 2, 2, 2, 1, 1, [40, 129], 12, dict(causal=True),
                 id="paged-vllm-decode-tiles-span-pages"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,B,Hq,Hk,Lq,L_new,lengths,block_size,options", KV_CASES)
def test_kv_cache_matches_attention_over_each_sequence(backend, layout, B, Hq, Hk, Lq, L_new,
                                                       lengths, block_size, options):
    require(backend)
    gen = torch.Generator().manual_seed(0)
    E, Ev, dtype = 32, 24, torch.float32
    capacity = max(lengths) + L_new + 5
    k_cache, v_cache, table, batch_idx = make_cache(layout, B, Hk, E, Ev, capacity,
                                                    block_size, dtype, gen)
    before = (k_cache.clone(), v_cache.clone())
    q = randn(B, Lq, Hq, E, dtype=dtype).transpose(1, 2)  # strided
    # New rows as strided views: k_new token-major, v_new every other element of its last dim.
    k_new = randn(B, L_new, Hk, E, dtype=dtype).transpose(1, 2) if L_new else None
    v_new = randn(B, Hk, L_new, 2 * Ev, dtype=dtype)[..., ::2] if L_new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    slopes = torch.rand(B, Hq) if options.pop("alibi", False) else None
    nan_heap((B, Hq, Lq, Ev), dtype=dtype)
    with fastattn.use_backend(backend), thread_pool(4):
        out, lse = fastattn.attention_with_kv_cache(
            q, k_cache, v_cache, seqlens, k_new, v_new, block_table=table,
            cache_batch_idx=batch_idx, alibi_slopes=slopes, return_lse=True, **options)
    assert out.shape == (B, Hq, Lq, Ev) and out.is_contiguous() and lse.shape == (B, Hq, Lq)
    assert torch.equal(seqlens, torch.tensor(lengths, dtype=torch.int32))
    window = options.get("window", (-1, -1))
    window = (window[0], 0 if options.get("causal") else window[1])
    for b, n in enumerate(lengths):
        keys, values = (cached_keys(c, b, n + L_new, table, batch_idx) for c in (k_cache,
                                                                                 v_cache))
        old_keys = cached_keys(before[0], b, n, table, batch_idx)
        assert torch.equal(keys[:, :n], old_keys), "valid prefix overwritten"
        if L_new:
            assert torch.equal(keys[:, n:], k_new[b]), "k_new not appended in place"
            assert torch.equal(values[:, n:], v_new[b]), "v_new not appended in place"
        ref, ref_lse = reference.attention_reference(
            q[b : b + 1].double(), keys[None].double(), values[None].double(), None,
            None if slopes is None else slopes[b], 0.0, None, E**-0.5, *window, True,
            options.get("softcap", 0.0))
        assert_close_to_reference(out[b : b + 1], ref, dtype=dtype, name=f"out[{b}]")
        assert_close_to_reference(lse[b : b + 1], ref_lse, dtype=dtype, name=f"lse[{b}]")
    # Nothing outside the appended positions changed.
    changed = sum(int((c != c0).any(dim=(1, 3)).sum()) for c, c0 in zip((k_cache, v_cache),
                                                                         before))
    assert changed <= 2 * B * L_new


def test_kv_cache_bf16_decode():
    require("cpu")
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, table, _ = make_cache("paged", 2, 2, 64, 64, 300, 32, torch.bfloat16, gen)
    q = randn(2, 4, 1, 64, dtype=torch.bfloat16)
    seqlens = torch.tensor([5, 290], dtype=torch.int32)
    out = fastattn.attention_with_kv_cache(q, k_cache, v_cache, seqlens, block_table=table)
    for b, n in enumerate(seqlens.tolist()):
        keys, values = (cached_keys(c, b, n, table, None)[None].double() for c in (k_cache,
                                                                                  v_cache))
        ref, _ = reference.attention_reference(q[b : b + 1].double(), keys, values, None, None,
                                               0.0, None, 64**-0.5, -1, -1, True, 0.0)
        assert_close_to_reference(out[b : b + 1], ref, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("grad_input", ["q", "k_new"])
def test_kv_cache_backward_raises_instead_of_dropping_gradients(backend, grad_input):
    # Without an autograd kernel torch's fallback warned and left q.grad None: a silent zero.
    require(backend)
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, _, _ = make_cache("contiguous", 2, 2, 8, 8, 16, 16, torch.float32, gen)
    q, k_new, v_new = randn(2, 2, 1, 8), randn(2, 2, 1, 8), randn(2, 2, 1, 8)
    {"q": q, "k_new": k_new}[grad_input].requires_grad_()
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    with fastattn.use_backend(backend):
        out = fastattn.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new)
        with torch.no_grad():
            # The new rows are in the caches now: attend over them without appending again.
            expected = fastattn.attention_with_kv_cache(q, k_cache, v_cache, seqlens + 1)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="attention_with_kv_cache is not differentiable"):
        out.sum().backward()
    with torch.no_grad():
        assert not fastattn.attention_with_kv_cache(q, k_cache, v_cache, seqlens).requires_grad


BAD_KV_CALLS = [
    # (changes to a good call, message); the bad value sits in the LAST sequence, so that an
    # implementation appending sequence by sequence would already have written the others.
    pytest.param(dict(seqlens=[3, 64]), "cache_seqlens.* \\+ L_new", id="overflow"),
    pytest.param(dict(seqlens=[3, -1]), "cache_seqlens.* \\+ L_new", id="negative-length"),
    pytest.param(dict(table_entry=99), "block_table", id="block-out-of-range"),
    pytest.param(dict(alibi=torch.rand(3)), "alibi_slopes", id="bad-alibi"),
    pytest.param(dict(window=(2,)), "window", id="bad-window"),
    pytest.param(dict(v_new_len=2), "v_new", id="k-v-new-mismatch"),
]


@pytest.mark.parametrize("check_values", [True, False], ids=["check_values", "check_values_off"])
@pytest.mark.parametrize("change,message", BAD_KV_CALLS)
def test_kv_cache_writes_nothing_on_error(change, message, check_values):
    require("cpu")
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, table, _ = make_cache("paged", 2, 2, 16, 16, 64, 16, torch.float32, gen)
    seqlens = torch.tensor(change.get("seqlens", [3, 40]), dtype=torch.int32)
    if "table_entry" in change:
        table[1, 2] = change["table_entry"]
    k_new, v_new = randn(2, 2, 1, 16), randn(2, 2, change.get("v_new_len", 1), 16)
    before = (k_cache.clone(), v_cache.clone())
    # The CPU op checks the values itself whatever check_values says, with ValueError.
    with pytest.raises(ValueError, match=message), fastattn.use_backend("cpu"):
        fastattn.attention_with_kv_cache(
            randn(2, 2, 1, 16), k_cache, v_cache, seqlens, k_new, v_new, block_table=table,
            alibi_slopes=change.get("alibi"), window=change.get("window", (-1, -1)),
            check_values=check_values)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_writes_bump_the_caches_versions(backend):
    """The caches are written in place as torch's in-place ops write them: their version counters
    move, so that a backward that saved a cache before the call raises instead of reading the new
    rows, and writing an inference tensor outside inference mode raises torch's error."""
    require(backend)
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, _, _ = make_cache("contiguous", 2, 2, 8, 8, 16, 16, torch.float32, gen)
    q, k_new, v_new = randn(2, 2, 1, 8), randn(2, 2, 1, 8), randn(2, 2, 1, 8)
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    weight = torch.rand(k_cache.shape, requires_grad=True)
    saved = (weight * k_cache).sum()  # saves k_cache for weight's gradient
    versions = k_cache._version, v_cache._version
    with fastattn.use_backend(backend):
        fastattn.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    with torch.inference_mode():
        k_frozen, v_frozen = k_cache.clone(), v_cache.clone()
    other_k, other_v = randn(2, 2, 1, 8), randn(2, 2, 1, 8)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside"):
        with fastattn.use_backend(backend):
            fastattn.attention_with_kv_cache(q, k_frozen, v_frozen, seqlens, other_k, other_v)
    if backend == "cpu":  # the reference's index_put_ (torch's) raises after it wrote
        assert torch.equal(k_frozen, k_cache) and torch.equal(v_frozen, v_cache)
    with torch.inference_mode(), fastattn.use_backend(backend):
        fastattn.attention_with_kv_cache(q, k_frozen, v_frozen, seqlens, other_k, other_v)
    assert not torch.equal(k_frozen, k_cache) and not torch.equal(v_frozen, v_cache)


# ---- opcheck and torch.compile -----------------------------------------------------------------


def _varlen_op_args(dtype, dropout):
    lens_q, lens_k = [3, 0, 9], [4, 2, 11]
    q = tokens(sum(lens_q), 4, 8, dtype).requires_grad_()
    k = tokens(sum(lens_k), 2, 8, dtype).requires_grad_()
    v = tokens(sum(lens_k), 2, 8, dtype).requires_grad_()
    seed = torch.tensor(5) if dropout else None
    return (q, k, v, cumulative(lens_q), cumulative(lens_k), 9, 11, torch.rand(3, 4),
            0.25 if dropout else 0.0, seed, 8**-0.5, 3, 0, True, 2.0 if dropout else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_varlen_ops(dtype):
    """The forward: every check in float32 with every option (dropout included), schema and
    fake-vs-real strides otherwise; the backward (no autograd of its own): schema and fake."""
    require("cpu")
    cheap = ("test_schema", "test_faketensor")
    for dropout in (False, True):
        args = _varlen_op_args(dtype, dropout)
        full = dtype == torch.float32 and dropout
        checks = torch.library._OPCHECK_DEFAULT_UTILS if full else cheap
        torch.library.opcheck(OPS.attention_varlen_fwd.default, args, test_utils=checks)
    out, lse = OPS.attention_varlen_fwd(*args)
    bwd_args = (torch.randn_like(out), *(t.detach() for t in args[:3]), out.detach(),
                lse.detach(), *args[3:])
    torch.library.opcheck(OPS.attention_varlen_bwd.default, bwd_args, test_utils=cheap)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_opcheck_kv_cache_op(paged):
    require("cpu")
    gen = torch.Generator().manual_seed(3)
    k, v, table, idx = make_cache("paged-vllm" if paged else "contiguous", 2, 2, 8, 8, 40, 16,
                                  torch.float32, gen)
    args = (randn(2, 4, 2, 8), k, v, torch.tensor([5, 30], dtype=torch.int32),
            randn(2, 2, 2, 8), randn(2, 2, 2, 8), table, idx, torch.rand(4), 0.3, -1, 0, True,
            0.0)
    torch.library.opcheck(OPS.attention_kv_cache_fwd.default, args)


@pytest.fixture
def inductor():
    """torch.compile with Inductor, fullgraph, on a fresh dynamo state (caches off, as in
    test_op_compile)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield lambda f, **kw: torch.compile(f, backend="inductor", fullgraph=True, **kw)
    torch._dynamo.reset()


def test_inductor_varlen_matches_eager(inductor):
    require("cpu")
    lens = [5, 0, 17, 1]
    cu = cumulative(lens)
    q, k, v = (randn(sum(lens), h, 16).requires_grad_() for h in (4, 2, 2))
    slopes = torch.rand(4)

    def f(q, k, v):
        out = fastattn.attention_varlen(q * 2, k, v, cu, cu, 17, 17, causal=True,
                                        alibi_slopes=slopes, softcap=4.0)
        return out + 1

    eager = f(q, k, v)
    grads = torch.autograd.grad(eager.sum(), (q, k, v))
    compiled = inductor(f, dynamic=False)(q, k, v)
    compiled_grads = torch.autograd.grad(compiled.sum(), (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_grads, grads):
        torch.testing.assert_close(c, e)


def test_inductor_decode_loop_compiles_once(inductor):
    """A sampler-style loop: each step appends one token to a paged cache (cache_seqlens grows)
    and attends; the compiled step matches eager and compiles once for every step."""
    require("cpu")
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hk, E = 2, 4, 2, 16
    k_cache, v_cache, table, _ = make_cache("paged", B, Hk, E, E, 64, 16, torch.float32, gen)
    eager_caches = (k_cache.clone(), v_cache.clone())

    def step(q, k_new, v_new, k_cache, v_cache, seqlens):
        out = fastattn.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new,
                                               block_table=table, causal=True)
        return out * 2

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    seqlens = torch.tensor([3, 20], dtype=torch.int32)
    for _ in range(4):
        q, k_new, v_new = randn(B, Hq, 1, E), randn(B, Hk, 1, E), randn(B, Hk, 1, E)
        ours = compiled(q, k_new, v_new, k_cache, v_cache, seqlens)
        theirs = step(q, k_new, v_new, *eager_caches, seqlens)
        torch.testing.assert_close(ours, theirs)
        seqlens = seqlens + 1
    torch.testing.assert_close(k_cache, eager_caches[0])
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 4 decode steps"
