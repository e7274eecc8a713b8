"""The one shape registry every benchmark file draws its cases from.

Three grids, picked with ``--shapes=smoke|quick|full`` or ``FASTATTN_BENCH_GRID``:

- ``smoke``: tiny shapes, every case runs once; the default under ``--benchmark-disable`` (CI).
- ``quick``: a representative subset; the CPU grid ran in 14 minutes on 2 cores (AVX2 EPYC,
  2026-12-04, baselines timed interleaved, calls over ``Grid.slow_call_s`` timed once); the GPU
  grid is sized for about 2 minutes on an H200 (an estimate: it has not run on one yet). The
  default otherwise.
- ``full``: the grids the issues set their speed targets on (CPU: issue 3's attention grid,
  issue 5's LSTM grid; GPU: issue 4's; both: issue 6's encoder, issue 9's varlen and
  sliding-window cases, issue 16's many-sequence varlen and paged decode cases). On 2 cores
  the full CPU grid takes hours: the lead runs it once, at the end.

Each grid has a CPU and a CUDA variant: the GPU has the memory and speed for longer sequences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

GRIDS = ("smoke", "quick", "full")


@dataclass(frozen=True)
class AttentionShape:
    """q [B, H, L, E], k and v [B, H, S, E]; causal is top-left aligned, as torch's is_causal."""

    B: int
    H: int
    L: int
    S: int
    E: int
    causal: bool

    @property
    def id(self) -> str:
        return f"B{self.B}-H{self.H}-L{self.L}-S{self.S}-E{self.E}" + (
            "-causal" if self.causal else ""
        )


@dataclass(frozen=True)
class VarlenShape:
    """Self-attention over packed sequences of these lengths: q, k, v [sum(lengths), H, E]."""

    lengths: tuple[int, ...]
    H: int
    E: int
    causal: bool

    @property
    def id(self) -> str:
        return (
            f"N{len(self.lengths)}-L{min(self.lengths)}..{max(self.lengths)}"
            f"-T{sum(self.lengths)}-H{self.H}-E{self.E}" + ("-causal" if self.causal else "")
        )


@dataclass(frozen=True)
class PagedDecodeShape:
    """One decode step over a paged KV cache: q [B, H, 1, E]; every sequence holds S positions
    (the last one appended by the step) in pages of block_size rows of a cache
    [num_blocks, H, block_size, E], its block table shuffled."""

    B: int
    H: int
    S: int
    E: int
    block_size: int

    @property
    def id(self) -> str:
        return f"B{self.B}-H{self.H}-S{self.S}-E{self.E}-block{self.block_size}"


@dataclass(frozen=True)
class WindowShape:
    """Causal sliding window: q [B, H, L, E], k and v [B, H, S, E]; query i sees keys
    i - window .. i (top-left aligned: fastattn.attention(causal=True, window=(window, 0)))."""

    B: int
    H: int
    L: int
    S: int
    E: int
    window: int

    @property
    def id(self) -> str:
        return f"B{self.B}-H{self.H}-L{self.L}-S{self.S}-E{self.E}-window{self.window}"


@dataclass(frozen=True)
class LSTMShape:
    """Input [T, B, I], hidden size H, one layer (a cell step uses T = 1)."""

    T: int
    B: int
    I: int  # noqa: E741  (torch's name for the input size)
    H: int

    @property
    def id(self) -> str:
        return f"T{self.T}-B{self.B}-I{self.I}-H{self.H}"


@dataclass(frozen=True)
class TransformerShape:
    """Self-attention over x [batch, seq, d_model]; ``layers`` encoder layers (1 = a bare MHA).

    dim_feedforward is torch's default (2048); dropout is 0 so both sides time the same math.
    """

    batch: int
    seq: int
    d_model: int
    heads: int
    layers: int

    @property
    def id(self) -> str:
        return f"N{self.batch}-L{self.seq}-D{self.d_model}-H{self.heads}-layers{self.layers}"


@dataclass(frozen=True)
class Grid:
    name: str
    attention: list[AttentionShape]
    attention_decode: list[AttentionShape]
    attention_dtypes: list[torch.dtype]
    attention_varlen: list[VarlenShape]
    attention_paged_decode: list[PagedDecodeShape]
    attention_window: list[WindowShape]
    attention_features_dtypes: list[torch.dtype]
    lstm_cell: list[LSTMShape]
    lstm: list[LSTMShape]
    lstm_dtypes: list[torch.dtype]
    mha: list[TransformerShape]
    encoder: list[TransformerShape]
    mha_dtypes: list[torch.dtype]
    # Timing per case: warm-up excluded; rounds = clamp(time_budget_s / t_call, min, max).
    time_budget_s: float = 0.3
    min_rounds: int = 3
    max_rounds: int = 50
    # A call slower than this runs once per measurement: such calls (nested-tensor SDPA takes
    # 10-35 s on the 64..2048 varlen case) are far from any ratio noise could flip, and min_rounds
    # of them cost minutes of the main job.
    slow_call_s: float = 5.0
    notes: list[str] = field(default_factory=list)

    def rounds(self, t_call: float) -> int:
        """How many timed rounds a measurement of calls taking ``t_call`` seconds gets."""
        if t_call > self.slow_call_s:
            return 1
        return max(self.min_rounds, min(self.max_rounds, round(self.time_budget_s / t_call)))


def _attention(Bs, Hs, Ls, Es, causals) -> list[AttentionShape]:
    return [
        AttentionShape(B, H, L, L, E, c)
        for L in Ls
        for B in Bs
        for H in Hs
        for E in Es
        for c in causals
    ]


def _decode(Bs, H, Ss, E) -> list[AttentionShape]:
    return [AttentionShape(B, H, 1, S, E, False) for S in Ss for B in Bs]


def _varlen(lengths, H, Es) -> list[VarlenShape]:
    return [VarlenShape(tuple(lengths), H, E, c) for E in Es for c in (False, True)]


def _varlen_many(H, E) -> list[VarlenShape]:
    return [VarlenShape(VARLEN_MANY_LENGTHS, H, E, True)]


def _window(Bs, Hs, Ls, E, window) -> list[WindowShape]:
    return [WindowShape(B, H, L, L, E, window) for L in Ls for B in Bs for H in Hs]


# Issue 9's speed targets: 8 sequences of mixed lengths 64..2048 (vs the padded batch), and a
# sliding window of 256 at L = 8192 (vs an explicit mask).
VARLEN_FULL_LENGTHS = (64, 128, 256, 512, 768, 1024, 1536, 2048)
WINDOW_FULL = 256
# Issue 16's targets: 256 sequences of 16..128 tokens (H 8, E 64, causal; vs the per-sequence
# SDPA loop, the per-sequence fastattn loop it replaced and nested-tensor SDPA), and a paged
# decode step at B = 32 with 2k-token contexts in pages of 16 (vs gathering the pages + SDPA).
VARLEN_MANY_LENGTHS = tuple(16 + (37 * i) % 113 for i in range(256))
PAGED_DECODE_FULL = PagedDecodeShape(B=32, H=8, S=2048, E=64, block_size=16)


def _lstm(Ts, Bs, Hs) -> list[LSTMShape]:
    return [LSTMShape(T, B, H, H) for T in Ts for B in Bs for H in Hs]


def _gpu_attention(tokens: int, Ls, H, Es, causals) -> list[AttentionShape]:
    # batch * seq held at `tokens` (as FlashAttention's benchmarks do): every case fills the chip.
    return [
        AttentionShape(max(1, tokens // L), H, L, L, E, c) for L in Ls for E in Es for c in causals
    ]


def _cpu_grid(name: str) -> Grid:
    fp32, bf16 = torch.float32, torch.bfloat16
    encoder_full = TransformerShape(batch=4, seq=1024, d_model=512, heads=8, layers=6)
    if name == "smoke":
        return Grid(
            name,
            attention=_attention([1], [2], [16], [16], [False, True]),
            attention_decode=_decode([1], 2, [64], 16),
            attention_dtypes=[fp32, bf16],
            attention_varlen=_varlen([5, 16, 1, 33, 9, 12, 7, 20], 2, [16]),
            attention_paged_decode=[PagedDecodeShape(B=3, H=2, S=40, E=16, block_size=16)],
            attention_window=_window([1], [2], [64], 16, 8),
            attention_features_dtypes=[fp32],
            lstm_cell=_lstm([1], [2], [8]),
            lstm=_lstm([3], [2], [8]),
            lstm_dtypes=[fp32],
            mha=[TransformerShape(2, 8, 32, 2, 1)],
            encoder=[TransformerShape(2, 8, 32, 2, 2)],
            mha_dtypes=[fp32],
            time_budget_s=0.02,
            min_rounds=3,
            max_rounds=5,
        )
    if name == "quick":
        return Grid(
            name,
            attention=_attention([1], [8], [128, 512, 1024], [64], [False, True]),
            # S = 512: a short context, where a call's fixed costs (Python, waking the threads)
            # weigh as much as the keys.
            attention_decode=_decode([1], 2, [512, 4096, 32768], 128),
            attention_dtypes=[fp32, bf16],
            attention_varlen=_varlen(VARLEN_FULL_LENGTHS, 8, [64]) + _varlen_many(8, 64),
            attention_paged_decode=[PAGED_DECODE_FULL],
            attention_window=_window([1], [2], [2048], 64, WINDOW_FULL),
            attention_features_dtypes=[fp32],
            # B1: one stream's decoding step (the one-step gates kernel,
            # csrc/lstm/lstm_step_gates_cpu.isa.cpp)
            lstm_cell=_lstm([1], [1, 64], [256]) + _lstm([1], [64], [512, 1024]),
            # B1, B4 and B24: a single stream's and small batches' sequences, where the kernels
            # put their lanes along the units (csrc/lstm/lstm_cpu.isa.cpp)
            lstm=_lstm([32], [16], [256, 512]) + _lstm([128], [1, 4], [256])
            + _lstm([64], [24], [256]),
            # bf16: on AMX-BF16 both sides run the recurrence on AMX (oneDNN's LSTM, our brgemm
            # products); elsewhere both convert.
            lstm_dtypes=[fp32, bf16],
            mha=[TransformerShape(4, 256, 512, 8, 1)],
            encoder=[TransformerShape(4, 256, 512, 8, 6)],
            mha_dtypes=[fp32],
            notes=["encoder at seq 256 (the full grid has issue 6's seq 1024) to fit 10 minutes"],
        )
    return Grid(
        name,
        attention=_attention([1, 4, 8], [8, 12], [128, 512, 1024, 4096], [64, 128], [False, True]),
        attention_decode=_decode([1, 2], 1, [4096, 16384, 32768], 128),
        attention_dtypes=[fp32, bf16],
        attention_varlen=_varlen(VARLEN_FULL_LENGTHS, 8, [64]) + _varlen_many(8, 64),
        attention_paged_decode=[PAGED_DECODE_FULL],
        attention_window=_window([1], [2, 4], [8192], 64, WINDOW_FULL),
        attention_features_dtypes=[fp32],
        lstm_cell=_lstm([1], [1, 16, 64], [256, 512, 1024]),
        lstm=_lstm([32, 128], [16, 64], [256, 512, 1024]) + _lstm([128], [1, 4], [256, 512])
        + _lstm([64], [24], [256, 512]),
        lstm_dtypes=[fp32, bf16],
        mha=[TransformerShape(4, 1024, 512, 8, 1)],
        encoder=[encoder_full],
        mha_dtypes=[fp32],
        time_budget_s=1.0,
        min_rounds=3,
        max_rounds=100,
    )


def _cuda_grid(name: str) -> Grid:
    fp32, bf16, fp16 = torch.float32, torch.bfloat16, torch.float16
    encoder_full = TransformerShape(batch=4, seq=1024, d_model=512, heads=8, layers=6)
    if name == "smoke":
        return _cpu_grid("smoke")
    if name == "quick":
        return Grid(
            name,
            attention=_gpu_attention(
                16384, [512, 1024, 2048, 4096, 8192], 16, [128], [False, True]
            ),
            attention_decode=_decode([1, 8], 16, [32768], 128),
            attention_dtypes=[bf16],
            attention_varlen=_varlen(VARLEN_FULL_LENGTHS, 8, [64]) + _varlen_many(8, 64),
            attention_paged_decode=[PAGED_DECODE_FULL],
            attention_window=_window([1], [4], [8192], 64, WINDOW_FULL),
            attention_features_dtypes=[bf16],
            lstm_cell=_lstm([1], [64], [256, 512, 1024]),
            # Issue 17's cuDNN target range (B <= 64, H <= 512); on the cuda backend H <= 256
            # (inference and training) runs the persistent kernels, H 512 the C++ step loop.
            # H = 32: the widest layer whose weights the triton backend's kernels keep on chip
            # (H 256/512 time its streamed variant, which the on-paper figures in
            # triton_kernels/lstm_layer.py rank below the cuda backend).
            lstm=_lstm([128], [16, 64], [256, 512]) + _lstm([128], [1, 64], [32]),
            lstm_dtypes=[fp32, bf16],
            mha=[TransformerShape(4, 1024, 512, 8, 1)],
            encoder=[encoder_full],
            mha_dtypes=[bf16],
            time_budget_s=0.15,
            min_rounds=5,
            max_rounds=100,
        )
    return Grid(
        name,
        attention=_gpu_attention(
            16384, [512, 1024, 2048, 4096, 8192, 16384], 16, [64, 128], [False, True]
        ),
        attention_decode=_decode([1, 2, 4, 8], 16, [8192, 32768], 128),
        attention_dtypes=[bf16, fp16],
        attention_varlen=_varlen(VARLEN_FULL_LENGTHS, 8, [64, 128])
        + _varlen([512 * i for i in range(1, 9)], 16, [128])
        + _varlen_many(8, 64),
        attention_paged_decode=[PAGED_DECODE_FULL,
                                PagedDecodeShape(B=32, H=16, S=8192, E=128, block_size=256)],
        attention_window=_window([1, 4], [4, 16], [8192, 32768], 64, WINDOW_FULL),
        attention_features_dtypes=[bf16, fp16],
        lstm_cell=_lstm([1], [16, 64], [256, 512, 1024]),
        lstm=_lstm([32, 128], [16, 64], [256, 512, 1024]) + _lstm([128], [1, 16, 64], [32]),
        lstm_dtypes=[fp32, bf16],
        mha=[TransformerShape(4, 1024, 512, 8, 1)],
        encoder=[encoder_full],
        mha_dtypes=[bf16, fp32],
        time_budget_s=0.5,
        min_rounds=10,
        max_rounds=200,
    )


def grid(name: str, device: torch.device) -> Grid:
    """The named grid for ``device`` (cpu or cuda)."""
    if name not in GRIDS:
        raise ValueError(f"unknown benchmark grid {name!r}; valid names: {', '.join(GRIDS)}")
    return _cuda_grid(name) if device.type == "cuda" else _cpu_grid(name)


def shape_dict(shape) -> dict[str, object]:
    return asdict(shape)
