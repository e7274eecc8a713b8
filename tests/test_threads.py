"""Concurrent calls from several Python threads give the same results as serial calls.

4 threads x 100 calls each of attention and the LSTM (forward and backward) on the cpu backend,
with shapes that vary from call to call, so that per-thread scratch buffers are resized while
other threads use theirs. A race (shared scratch, unsynchronized caches or registrations) shows
up as a result that differs from the serial one.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import randn

import fastattn

THREADS = 4
CALLS = 100

pytestmark = pytest.mark.skipif(
    not fastattn.backends()["cpu"].usable, reason="fastattn._C (CPU kernels) is not built"
)


def attention_case(i: int) -> tuple[torch.Tensor, ...]:
    L, S, E = 1 + (i * 7) % 40, 1 + (i * 13) % 150, (8, 17, 32)[i % 3]
    q, k, v, g = randn(1, 2, L, E), randn(1, 2, S, E), randn(1, 2, S, E), randn(1, 2, L, E)
    return q, k, v, g


def run_attention(q, k, v, g) -> list[torch.Tensor]:
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2])
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


LSTMS: dict[int, fastattn.LSTM] = {}


def lstm_case(i: int) -> tuple:
    T, B = 1 + i % 6, 1 + i % 4
    return i % 2, randn(T, B, 5), randn(T, B, 8 if i % 2 == 0 else 6)  # 6: two directions of 3


def run_lstm(which, x, g) -> list[torch.Tensor]:
    # Parameter .grad is shared module state (as in torch): autograd.grad hands each call its
    # own gradients instead of accumulating into one another's.
    lstm = LSTMS[which]
    x = x.clone().requires_grad_()
    out, (h, c) = lstm(x)
    grads = torch.autograd.grad(
        (out, h, c), [x, *lstm.parameters()], (g, torch.ones_like(h), torch.ones_like(c))
    )
    return [out.detach(), h.detach(), c.detach(), *grads]


@pytest.fixture(scope="module", autouse=True)
def _lstms():
    torch.manual_seed(0)
    LSTMS[0] = fastattn.LSTM(5, 8)
    LSTMS[1] = fastattn.LSTM(5, 3, bidirectional=True)


def serial_and_concurrent(make_case, run, compare):
    cases = [make_case(i) for i in range(CALLS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(offset: int) -> None:
        try:
            start.wait()
            with fastattn.use_backend("cpu"):  # the context variable is per thread
                for j in range(CALLS):
                    i = (j + offset * 17) % CALLS  # each thread its own order
                    compare(run(*cases[i]), expected[i], i)
        except BaseException as error:  # noqa: BLE001  (reported by the main thread)
            errors.append(error)

    with fastattn.use_backend("cpu"):
        expected = [run(*case) for case in cases]
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} thread(s) failed; first: {errors[0]!r}"


def same(actual: list[torch.Tensor], expected: list[torch.Tensor], i: int) -> None:
    for n, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"call {i}, result {n}: differs from the serial call"


def test_attention_from_threads_matches_serial():
    serial_and_concurrent(attention_case, run_attention, same)


def test_lstm_from_threads_matches_serial():
    serial_and_concurrent(lstm_case, run_lstm, same)
