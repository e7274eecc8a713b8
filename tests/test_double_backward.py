"""Double backward through the fused ops raises a clear error (their backward formulas are
first-order only) instead of returning wrong second derivatives; first-order gradients taken with
create_graph=True are still right, and the reference backend's second derivatives are exact."""

from __future__ import annotations

import pytest
import torch

import fastattn

needs_cpu_kernels = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built")
F64 = torch.float64


def _lstm(**options):
    return fastattn.LSTM(3, 4, num_layers=2, **options).to(F64)


# Each case: (make the module or function, make its input). The function returns one tensor.
CASES = [
    pytest.param(lambda: fastattn.LSTMCell(3, 4).to(F64), lambda: torch.randn(2, 3, dtype=F64),
                 id="LSTMCell"),
    pytest.param(lambda: _lstm(), lambda: torch.randn(5, 2, 3, dtype=F64), id="LSTM"),
    pytest.param(lambda: _lstm(proj_size=2, bidirectional=True),
                 lambda: torch.randn(5, 2, 3, dtype=F64), id="LSTM-proj-bidirectional"),
    pytest.param(lambda: _lstm(layer_norm=True), lambda: torch.randn(5, 2, 3, dtype=F64),
                 id="LSTM-layer-norm"),
    pytest.param(lambda: lambda q: fastattn.scaled_dot_product_attention(q, q.flip(2), q * 2),
                 lambda: torch.randn(1, 2, 5, 8, dtype=F64), id="attention"),
]


def _first_output(f, x):
    out = f(x)
    return out[0] if isinstance(out, tuple) else out


@needs_cpu_kernels
@pytest.mark.parametrize("make_f,make_x", CASES)
def test_double_backward_raises_clearly(make_f, make_x):
    f, x = make_f(), make_x().requires_grad_()
    with fastattn.use_backend("cpu"):
        out = _first_output(f, x)
        grad_out = torch.randn_like(out)
        # create_graph=True alone is fine, and gives the same first-order gradient
        (g,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
        (g_plain,) = torch.autograd.grad(_first_output(f, x), x, grad_out)
        torch.testing.assert_close(g, g_plain, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="double backward .* is not supported"):
            g.pow(2).sum().backward()


@needs_cpu_kernels
def test_double_backward_through_saved_weights_raises():
    # A gradient penalty on a weight gradient: the incoming gradient does not require grad, only
    # the saved weights do. It must still raise, not drop the penalty's gradient.
    lstm = _lstm()
    with fastattn.use_backend("cpu"):
        out, _ = lstm(torch.randn(5, 2, 3, dtype=F64))
        (g,) = torch.autograd.grad(out.sum(), lstm.weight_hh_l0, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.pow(2).sum().backward()


# (The LayerNorm and projection variants' float64 gradgradcheck takes a minute on the reference.)
@pytest.mark.parametrize("make_f,make_x", [CASES[0], CASES[1], CASES[4]])
def test_reference_backend_second_derivatives(make_f, make_x):
    # The error message's advice: the reference backend differentiates twice through autograd.
    f, x = make_f(), make_x().requires_grad_()
    with fastattn.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda t: _first_output(f, t), (x,))
