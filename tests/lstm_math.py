"""Plain-PyTorch LSTM math shared by the LSTM kernel tests: the oracles, evaluated at the
inputs' dtype (torch's own result) or on float64 copies (the reference)."""

from __future__ import annotations

import torch


def cell_math(gates: torch.Tensor, cx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gates [B, 4H] pre-activation (i, f, g, o), cx [B, H] -> (hy, cy), as nn.LSTMCell."""
    i, f, g, o = gates.chunk(4, dim=1)
    cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy


def cell_grads(gates, cx, grad_hy, grad_cy, dtype):
    """(grad_gates, grad_cx) of cell_math by autograd, computed at ``dtype``."""
    g = gates.detach().to(dtype).requires_grad_()
    c = cx.detach().to(dtype).requires_grad_()
    hy, cy = cell_math(g, c)
    return torch.autograd.grad((hy, cy), (g, c), (grad_hy.to(dtype), grad_cy.to(dtype)))


def cancelling_cell_gradient_grads(layer_fwd, x_proj, h0, c0, w_hh, grad_h):
    """One layer step (x_proj [1, B, 4H], no options) whose backward's cell gradient cancels.

    dc = grad_c + grad_h * o * (1 - tanh^2(c)) with grad_c = -0.97 times the second term
    (float64, rounded to the inputs' dtype) keeps 3% of its terms, so any error of the saved
    gates reaches grad c0 = f * dc ~33 times magnified: kernels that saved them rounded to
    bfloat16 / float16 got grad c0 several percent wrong (PyTorch's autograd keeps the step's
    float32 intermediates). T = 1, so no rounded state enters either side. Returns the
    gradients of (x_proj, h0, c0, w_hh) by ``layer_fwd`` (lstm_layer_fwd's schema, with
    autograd), by the reference in float64, and by the reference at the inputs' dtype.
    """
    from fastattn.ops import reference

    dtype = x_proj.dtype
    gates = reference.lstm_gate_activations(x_proj.double() + h0.double() @ w_hh.double().t())
    i, f, g, o = gates.chunk(4, dim=-1)
    grad_c = (-0.97 * grad_h.double() * o * (1 - (f * c0.double() + i * g).tanh() ** 2)).to(dtype)

    def grads(fn, cast):
        leaves = [t.to(cast).requires_grad_() for t in (x_proj, h0, c0, w_hh)]
        h_all, c_all = fn(*leaves, None, None, False, None, None)[:2]
        loss = (h_all * grad_h.to(cast)).sum() + (c_all * grad_c.to(cast)).sum()
        return torch.autograd.grad(loss, leaves)

    return (grads(layer_fwd, dtype), grads(reference.lstm_layer_reference, torch.float64),
            grads(reference.lstm_layer_reference, dtype))


def sequence_math(x_proj, h0, c0, w_hh):
    """x_proj [T, B, 4H], h0, c0 [B, H], w_hh [4H, H] -> (h_all, c_all [T, B, H], activated
    gates_all [T, B, 4H]) by a loop of cell steps."""
    h, c = h0, c0
    h_all, c_all, gates_all = [], [], []
    for t in range(x_proj.shape[0]):
        gates = x_proj[t] + h @ w_hh.t()
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        h_all.append(h)
        c_all.append(c)
        gates_all.append(torch.cat([i, f, g, o], dim=1))
    return torch.stack(h_all), torch.stack(c_all), torch.stack(gates_all)


def sequence_inputs(seq_len, batch, hidden, dtype, device):
    """Fresh random (x_proj, h0, c0, w_hh), w_hh scaled like nn.LSTM's init so that the
    recurrence neither explodes nor vanishes."""
    x_proj = torch.randn(seq_len, batch, 4 * hidden, dtype=dtype, device=device)
    h0, c0 = torch.randn(2, batch, hidden, dtype=dtype, device=device).unbind(0)
    w_hh = torch.randn(4 * hidden, hidden, dtype=dtype, device=device) / hidden**0.5
    return x_proj, h0, c0, w_hh


def layer_oracles(inputs, reverse, grad_h_all, grad_c_all):
    """What one lstm_layer_fwd / _bwd call should give, by fastattn.ops.reference.

    inputs = (x_proj, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h). Returns
    (forward64, forward_torch, grads64, grads_torch): the forward outputs (h_all, c_all, gates_all,
    hpre_all) on float64 copies and at the inputs' dtype; the gradients (x_proj, h0, c0, w_hh
    and w_hr when given) of sum(h_all * grad_h_all) + sum(c_all * grad_c_all) by float64
    autograd, and by lstm_layer_bwd_reference at the inputs' dtype.
    """
    from fastattn.ops import reference

    x_proj, h0, c0, w_hh, w_hr, batch_sizes, zoneout_c, zoneout_h = inputs

    def f64(t):
        return None if t is None else t.double()

    forward64 = reference.lstm_layer_reference(
        *map(f64, (x_proj, h0, c0, w_hh, w_hr)), batch_sizes, reverse, f64(zoneout_c),
        f64(zoneout_h))
    forward_torch = reference.lstm_layer_reference(
        x_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h)
    leaves = [t.double().requires_grad_() for t in (x_proj, h0, c0, w_hh, w_hr) if t is not None]
    h_all, c_all, _, _ = reference.lstm_layer_reference(
        *leaves[:4], leaves[4] if w_hr is not None else None, batch_sizes, reverse,
        f64(zoneout_c), f64(zoneout_h))
    grads64 = torch.autograd.grad(
        (h_all * grad_h_all.double()).sum() + (c_all * grad_c_all.double()).sum(), leaves)
    grads_torch = reference.lstm_layer_bwd_reference(
        grad_h_all, grad_c_all, h0, c0, w_hh, w_hr, batch_sizes, reverse, zoneout_c, zoneout_h,
        *forward_torch)
    return forward64, forward_torch, grads64, grads_torch


def _ln_saved_rows_f64(x_proj, h0, c0, w_hh, batch_sizes, reverse, eps, h_all, c_all, gates_all):
    """What the LN op saves beyond the reference's outputs (hh_norm_all, c_norm_all, rstd_all), in
    float64, from the float64 reference run's states; zeros in rows that do not step."""
    T, B, G = x_proj.shape
    H = G // 4
    sizes = [B] * T if batch_sizes is None else batch_sizes.tolist()
    hh_norm = torch.zeros(T, B, G, dtype=torch.float64)
    c_norm = torch.zeros(T, B, H, dtype=torch.float64)
    rstd = torch.zeros(T, B, 2, dtype=torch.float64)
    for t in range(T):
        first = t == (T - 1 if reverse else 0)
        prev = t + 1 if reverse else t - 1
        h_prev = h0.double() if first else h_all[prev]
        c_prev = c0.double() if first else c_all[prev]
        n = sizes[t]
        hh = h_prev[:n] @ w_hh.double().t()
        i, f, g, _ = gates_all[t, :n].chunk(4, dim=-1)
        cell = f * c_prev[:n] + i * g
        for k, v in enumerate((hh, cell)):
            var, mean = torch.var_mean(v, dim=-1, unbiased=False, keepdim=True)
            r = (var + eps).rsqrt()
            (hh_norm if k == 0 else c_norm)[t, :n] = (v - mean) * r
            rstd[t, :n, k] = r.squeeze(-1)
    return hh_norm, c_norm, rstd


def ln_layer_oracles(inputs, reverse, eps, grad_h_all, grad_c_all):
    """What one lstm_ln_layer_fwd / _bwd call should give, by fastattn.ops.reference (on the CPU).

    inputs = helpers.ln_layer_inputs' (x_proj, h0, c0, w_hh, (ln_hh_weight, ln_c_weight,
    ln_c_bias), w_hr, batch_sizes, zoneout_c, zoneout_h). Returns (forward64, forward_torch,
    saved64, grads64, grads_torch): h_all, c_all, gates_all, hpre_all on float64 copies and at
    the inputs' dtype; hh_norm_all, c_norm_all, rstd_all in float64; the gradients (x_proj, h0,
    c0, w_hh, the three LN weights, and w_hr when given) of sum(h_all * grad_h_all) +
    sum(c_all * grad_c_all) by autograd through the reference in float64 and at the inputs'
    dtype.
    """
    from fastattn.ops import reference

    x_proj, h0, c0, w_hh, ln, w_hr, batch_sizes, zc, zh = inputs

    def run(dt, grad: bool):
        leaves = [t.detach().to(dt).requires_grad_(grad) for t in (x_proj, h0, c0, w_hh, *ln)]
        if w_hr is not None:
            leaves.append(w_hr.detach().to(dt).requires_grad_(grad))
        cast = (lambda t: None if t is None else t.to(dt))
        out = reference.lstm_layer_reference(
            *leaves[:4], leaves[7] if w_hr is not None else None, batch_sizes, reverse, cast(zc),
            cast(zh), layer_norm=(*leaves[4:7], eps))
        if not grad:
            return out
        loss = (out[0] * grad_h_all.to(dt)).sum() + (out[1] * grad_c_all.to(dt)).sum()
        return torch.autograd.grad(loss, leaves)

    forward64, forward_torch = run(torch.float64, False), run(x_proj.dtype, False)
    saved64 = _ln_saved_rows_f64(x_proj, h0, c0, w_hh, batch_sizes, reverse, eps, *forward64[:3])
    return (forward64, forward_torch, saved64, run(torch.float64, True),
            run(x_proj.dtype, True))
