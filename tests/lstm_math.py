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
