"""fastattn::linear (F.linear's product on fastattn's own CPU GEMM) and fastattn.ops.linear, which
takes it where that GEMM beats torch.mm's (AMD CPUs) and is F.linear everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import OpRecorder, assert_close_to_reference, nan_heap, randn

import fastattn
from fastattn.ops import linear as linear_ops

OPS = torch.ops.fastattn
needs_cpu_kernels = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
# M = 130: two 64-row brgemm blocks and a 2-row tail; M = 520: enough rows for the input gradient
# on brgemm too (where it wins such products: AMD Zen 5 on); M = 63: too few rows for brgemm
# (torch.mm); M = 0: empty
@pytest.mark.parametrize("M", [130, 520, 63, 0])
# grad as lstm_layer_bwd gives it on CPU (feature-major: its transpose contiguous) and row-major
@pytest.mark.parametrize("grad_layout", ["feature_major", "row_major"])
# input rows K apart or further (a column slice: the padded last block is then laid out anew)
@pytest.mark.parametrize("x_layout", ["contiguous", "row_stride"])
def test_linear_matches_torch(dtype, bias, M, grad_layout, x_layout):
    # Sizes off every brgemm block (64 rows and columns, 512 deep): the product, then the
    # gradients, as the module's backward takes them.
    N, K = 100, 515
    x = randn(M, K, dtype=dtype) if x_layout == "contiguous" else (
        randn(M, K + 9, dtype=dtype)[:, 4:-5])
    w = randn(N, K, dtype=dtype)
    b = randn(N, dtype=dtype) if bias else None

    def product(x, w, b=None):
        return x @ w.t() + (b if b is not None else 0)

    want64 = product(x.double(), w.double(), b.double() if bias else None)
    nan_heap((M, N), dtype=dtype)
    got = OPS.linear(x, w, b)
    assert got.shape == (M, N) and got.is_contiguous()
    assert_close_to_reference(got, want64, product(x, w, b), name="out")
    args = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    grad = randn(M, N, dtype=dtype) if grad_layout == "row_major" else randn(N, M, dtype=dtype).t()
    inputs = [t for t in args if t is not None]
    got_grads = torch.autograd.grad(OPS.linear(*args), inputs, grad)
    args64 = [t.detach().double().requires_grad_() for t in inputs]
    want_grads = torch.autograd.grad(product(*args64), args64, grad.double())
    for name, g, want in zip(("grad_input", "grad_weight", "grad_bias"), got_grads, want_grads,
                             strict=False):
        assert_close_to_reference(g, want, name=name)
    torch.library.opcheck(OPS.linear.default, args)


def _gemm_wins() -> bool:
    return linear_ops._GEMM_WINS


@needs_cpu_kernels
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
# [2, 40, K]: 80 rows with leading dims (the op where the GEMM wins); a transposed [40, 2, K]
# view; [7, K]: too few rows (F.linear); [3, 0, K]: empty
@pytest.mark.parametrize("shape", ["leading", "transposed", "few_rows", "empty"])
def test_linear_matches_f_linear(bias, shape):
    """fastattn.ops.linear against F.linear in float32 and float64: output and every gradient
    within 2x F.linear's float32 error; the op serves exactly the calls takes_op promises."""
    K, N = 37, 33
    x = {"leading": lambda: randn(2, 40, K), "transposed": lambda: randn(2, 40, K).transpose(0, 1),
         "few_rows": lambda: randn(7, K), "empty": lambda: randn(3, 0, K)}[shape]()
    w, b = randn(N, K), randn(N) if bias else None
    tensors = [t for t in (x, w, b) if t is not None]
    grad = randn(*x.shape[:-1], N)

    def run(fn, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in tensors]
        out = fn(*args)
        return [out, *torch.autograd.grad(out, args, grad.to(dtype))]

    with OpRecorder() as recorder:
        ours = run(linear_ops.linear, torch.float32)
    theirs, want64 = run(F.linear, torch.float32), run(F.linear, torch.float64)
    for name, a, r, t in zip(["out", "grad_input", "grad_weight", "grad_bias"], ours, want64,
                             theirs, strict=False):
        assert a.shape == t.shape, name
        assert_close_to_reference(a, r, t, name=name)
    served = "fastattn.linear.default" in recorder.seen
    assert served == (_gemm_wins() and shape in ("leading", "transposed"))


@needs_cpu_kernels
def test_linear_under_autocast_is_f_linear():
    """Under CPU autocast F.linear runs in bfloat16; so does fastattn.ops.linear (not the op)."""
    x, w, b = randn(80, 16), randn(8, 16), randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16), OpRecorder() as recorder:
        out = linear_ops.linear(x, w, b)
        want = F.linear(x, w, b)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    assert "fastattn.linear.default" not in recorder.seen


@needs_cpu_kernels
def test_linear_bad_input_raises_as_f_linear():
    x = randn(80, 16)
    for w, b in ((randn(8, 15), None), (randn(8, 16), randn(7)), (randn(8, 16).double(), None)):
        with pytest.raises(RuntimeError) as theirs:
            F.linear(x, w, b)
        with pytest.raises(type(theirs.value)):
            linear_ops.linear(x, w, b)
