"""Drop-in fidelity over random combinations of options: fastattn.LSTM, fastattn.LSTMCell,
fastattn.MultiheadAttention and fastattn.scaled_dot_product_attention against torch's,
configurations drawn from a seeded generator (the test id names the seed; the failure message
names the configuration). The other tests pin each option and a few combinations; these catch an
interaction of options that none of them pairs. float64, so that any difference is a bug, not
rounding: outputs, final states, attention weights and the gradients of every input and
parameter (NaN where torch's are NaN), or the exception type torch raises."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastattn

CONFIGS_PER_SEED = 12


def _draws(seed: int):
    """The generator a test draws its configurations from, once per configuration, with torch's
    seed set afresh before each (so that a failing configuration reruns alone)."""
    rng = random.Random(seed)
    for n in range(CONFIGS_PER_SEED):
        torch.manual_seed(1000 * seed + n)
        yield rng


def _grads(outputs, leaves) -> tuple:
    """The gradients of leaves for a fixed, nonuniform gradient of each output (None where a
    leaf does not reach the outputs)."""
    upstream = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape) for t in outputs]
    return torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)


def _assert_same_or_same_error(run, theirs, ours, config):
    """run(ours) returns what run(theirs) returns (a flat list of tensors or None: None and a
    zero tensor both mean no gradient), NaN where it has NaN, or raises an instance of the
    exception type run(theirs) raises."""
    try:
        expected = run(theirs)
    except Exception as torch_error:  # whatever torch raises is the spec
        with pytest.raises(type(torch_error)):
            run(ours)
        return
    actual = run(ours)
    assert len(actual) == len(expected), config
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        if a is None or b is None:  # compare the nonzero elements: none where there is no gradient
            a, b = (torch.zeros(0) if t is None else t.flatten()[t.flatten() != 0] for t in (a, b))
        torch.testing.assert_close(a, b, equal_nan=True,
                                   msg=lambda m, i=i: f"tensor {i} of {config}: {m}")


def _lstm_config(rng: random.Random) -> dict:
    hidden = rng.choice([3, 5])
    return dict(
        input_size=rng.choice([1, 4]), hidden_size=hidden, num_layers=rng.choice([1, 2]),
        bidirectional=rng.random() < 0.5, proj_size=rng.choice([0, 0, 2]),
        batch_first=rng.random() < 0.5, bias=rng.random() < 0.8,
        T=rng.choice([1, 4]), B=rng.choice([1, 3, 16, 17]),
        form=rng.choice(["padded", "padded", "packed", "unbatched"]),
        with_hx=rng.random() < 0.5, train=rng.random() < 0.5,
    )


def _lstm_run(module, x, hx, lengths, leaves):
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h_n, c_n) = module(inp, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    grads = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)
             for t in (data, h_n, c_n)]
    return [data, h_n, c_n, *torch.autograd.grad((data, h_n, c_n), leaves, grads,
                                                 allow_unused=True)]


def _check_lstm(c: dict, rng: random.Random) -> None:
    flags = {k: c[k] for k in ("num_layers", "bidirectional", "proj_size", "batch_first", "bias")}
    # dropout between layers only in eval (in training it draws its own random masks)
    dropout = 0.0 if c["train"] else 0.5
    theirs = torch.nn.LSTM(c["input_size"], c["hidden_size"], dropout=dropout,
                           dtype=torch.float64, **flags).train(c["train"])
    ours = fastattn.LSTM(c["input_size"], c["hidden_size"], dropout=dropout,
                         dtype=torch.float64, **flags).train(c["train"])
    ours.load_state_dict(theirs.state_dict())
    T, B, layers = c["T"], c["B"], c["num_layers"] * (2 if c["bidirectional"] else 1)
    batch = () if c["form"] == "unbatched" else (B,)
    if c["form"] == "unbatched":
        shape = (T, c["input_size"])
    elif c["batch_first"] and c["form"] == "padded":
        shape = (B, T, c["input_size"])
    else:  # pack_padded_sequence below reads [T, B, I]
        shape = (T, B, c["input_size"])
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    hx = None
    if c["with_hx"]:
        p = c["proj_size"] or c["hidden_size"]
        hx = (torch.randn(layers, *batch, p, dtype=torch.float64, requires_grad=True),
              torch.randn(layers, *batch, c["hidden_size"], dtype=torch.float64,
                          requires_grad=True))
    lengths = [rng.randint(1, T) for _ in range(B)] if c["form"] == "packed" else None

    def run(module):
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h_n, c_n) = module(inp, hx)
        data = out.data if isinstance(out, PackedSequence) else out
        outputs = (data, h_n, c_n)
        return [*outputs, *_grads(outputs, [x, *(hx or ()), *module.parameters()])]

    _assert_same_or_same_error(run, theirs, ours, {**c, "lengths": lengths})


@pytest.mark.parametrize("seed", range(4))
def test_lstm_random_option_combinations_match_torch(seed):
    for rng in _draws(seed):
        _check_lstm(_lstm_config(rng), rng)


def _mha_config(rng: random.Random) -> dict:
    embed = rng.choice([4, 8])
    self_attention = rng.random() < 0.4
    return dict(
        embed_dim=embed, num_heads=rng.choice([h for h in (1, 2, 4) if embed % h == 0]),
        bias=rng.random() < 0.8, add_bias_kv=rng.random() < 0.2, add_zero_attn=rng.random() < 0.2,
        kdim=None if self_attention else rng.choice([None, 5]),
        vdim=None if self_attention else rng.choice([None, 3]),
        batch_first=rng.random() < 0.5, self_attention=self_attention,
        L=rng.choice([1, 3, 5]), S=rng.choice([1, 4]), B=rng.choice([1, 2]),
        unbatched=rng.random() < 0.15,
        key_padding_mask=rng.choice([None, "bool", "float"]),
        attn_mask=rng.choice([None, None, "bool", "float", "bool per head"]),
        is_causal=rng.random() < 0.15, need_weights=rng.random() < 0.5,
        average_attn_weights=rng.random() < 0.5, train=rng.random() < 0.5,
    )


def _check_mha(c: dict) -> None:
    f64 = torch.float64
    flags = {k: c[k] for k in ("bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim",
                               "batch_first")}
    theirs = torch.nn.MultiheadAttention(c["embed_dim"], c["num_heads"], dtype=f64,
                                         **flags).train(c["train"])
    ours = fastattn.MultiheadAttention(c["embed_dim"], c["num_heads"], dtype=f64,
                                       **flags).train(c["train"])
    ours.load_state_dict(theirs.state_dict())
    L, S, B = c["L"], (c["L"] if c["self_attention"] else c["S"]), c["B"]

    def tokens(n_tokens, width):
        if c["unbatched"]:
            shape = (n_tokens, width)
        else:
            shape = (B, n_tokens, width) if c["batch_first"] else (n_tokens, B, width)
        return torch.randn(shape, dtype=f64, requires_grad=True)

    q = tokens(L, c["embed_dim"])
    k, v = (q, q) if c["self_attention"] else (
        tokens(S, c["kdim"] or c["embed_dim"]), tokens(S, c["vdim"] or c["embed_dim"]))
    padding = None
    if c["key_padding_mask"]:
        padding = torch.rand((S,) if c["unbatched"] else (B, S)) < 0.3
        if c["key_padding_mask"] == "float":
            padding = torch.zeros(padding.shape, dtype=f64).masked_fill(padding, -torch.inf)
    mask = None
    if c["attn_mask"]:
        heads = c["num_heads"] * (1 if c["unbatched"] else B)
        shape = (heads, L, S) if c["attn_mask"] == "bool per head" else (L, S)
        mask = torch.randn(shape, dtype=f64) if c["attn_mask"] == "float" else (
            torch.rand(shape) < 0.3)
    elif c["is_causal"]:  # torch's MHA takes is_causal as a hint about the mask it is given
        mask = torch.ones(L, S, dtype=torch.bool).triu(1)
    kwargs = dict(key_padding_mask=padding, attn_mask=mask, need_weights=c["need_weights"],
                  average_attn_weights=c["average_attn_weights"], is_causal=c["is_causal"])

    def run(module):
        out, weights = module(q, k, v, **kwargs)
        leaves = [q] if c["self_attention"] else [q, k, v]
        return [out, weights, *_grads((out,), leaves + list(module.parameters()))]

    _assert_same_or_same_error(run, theirs, ours, c)


@pytest.mark.parametrize("seed", range(4))
def test_mha_random_option_combinations_match_torch(seed):
    for rng in _draws(seed):
        _check_mha(_mha_config(rng))


def _check_lstm_cell(c: dict) -> None:
    f64 = torch.float64
    theirs = torch.nn.LSTMCell(c["input_size"], c["hidden_size"], bias=c["bias"], dtype=f64)
    ours = fastattn.LSTMCell(c["input_size"], c["hidden_size"], bias=c["bias"], dtype=f64)
    ours.load_state_dict(theirs.state_dict())
    lead = () if c["unbatched"] else (c["B"],)
    x = torch.randn(*lead, c["input_size"], dtype=f64, requires_grad=True)
    hx = None
    if c["with_hx"]:
        hx = tuple(torch.randn(*lead, c["hidden_size"], dtype=f64, requires_grad=True)
                   for _ in range(2))

    def run(module):
        outputs = module(x, hx)
        return [*outputs, *_grads(outputs, [x, *(hx or ()), *module.parameters()])]

    _assert_same_or_same_error(run, theirs, ours, c)


@pytest.mark.parametrize("seed", range(2))
def test_lstm_cell_random_option_combinations_match_torch(seed):
    for rng in _draws(seed):
        _check_lstm_cell(dict(
            input_size=rng.choice([1, 4]), hidden_size=rng.choice([1, 5, 33]),
            B=rng.choice([1, 3, 7, 16, 17]), bias=rng.random() < 0.8,
            unbatched=rng.random() < 0.2, with_hx=rng.random() < 0.6))


def _check_sdpa(c: dict) -> None:
    f64 = torch.float64
    lead_q = (c["Hq"],) if c["dims"] == 3 else (c["B"], c["Hq"])
    lead_k = (c["Hk"],) if c["dims"] == 3 else (c["B"], c["Hk"])
    L, S, E = c["L"], c["S"], c["E"]
    q = torch.randn(*lead_q, L, E, dtype=f64, requires_grad=True)
    k = torch.randn(*lead_k, S, E, dtype=f64, requires_grad=True)
    v = torch.randn(*lead_k, S, c["Ev"], dtype=f64, requires_grad=True)
    if c["transposed"]:  # a non-contiguous view: the same values, another memory order
        q = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    mask, leaves = None, [q, k, v]
    if c["mask"] in ("bool", "bool with a blocked row"):
        mask = torch.rand(L, S) < 0.6
        if c["mask"] == "bool with a blocked row":
            mask[L // 2] = False
    elif c["mask"] in ("float", "float with a -inf row"):
        mask = torch.randn(L, S, dtype=f64)
        if c["mask"] == "float with a -inf row":
            mask[L // 2] = -torch.inf
    elif c["mask"] == "float, requires grad":
        mask = torch.randn(L, S, dtype=f64, requires_grad=True)
        leaves.append(mask)
    kwargs = dict(attn_mask=mask, is_causal=c["is_causal"], scale=c["scale"],
                  enable_gqa=c["enable_gqa"])

    def run(sdpa):
        out = sdpa(q, k, v, **kwargs)
        return [out, *_grads((out,), leaves)]

    _assert_same_or_same_error(run, F.scaled_dot_product_attention,
                               fastattn.scaled_dot_product_attention, c)


@pytest.mark.parametrize("seed", range(2))
def test_sdpa_random_option_combinations_match_torch(seed):
    for rng in _draws(seed):
        hk = rng.choice([1, 2])
        hq = hk * rng.choice([1, 2])
        e = rng.choice([1, 8])
        _check_sdpa(dict(
            dims=rng.choice([3, 4]), B=rng.choice([1, 2]), Hq=hq, Hk=hk,
            enable_gqa=hq != hk or rng.random() < 0.2, L=rng.choice([1, 5, 17]),
            S=rng.choice([1, 6, 17]), E=e, Ev=rng.choice([e, 4]),
            is_causal=rng.random() < 0.3, scale=rng.choice([None, 0.5]),
            transposed=rng.random() < 0.3,
            mask=rng.choice([None, "bool", "bool with a blocked row", "float",
                             "float with a -inf row", "float, requires grad"])))
