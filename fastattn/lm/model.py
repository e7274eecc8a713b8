"""The two language models of the reference trainer: a small GPT and an LSTM LM.

``backend="fastattn"`` routes attention through ``fastattn.scaled_dot_product_attention`` and
the recurrence through ``fastattn.LSTM``; ``backend="torch"`` uses
``F.scaled_dot_product_attention`` and ``nn.LSTM``. Both backends build identical parameters
from the same seed (same names, shapes, init order), so runs can be compared step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.lm.data import VOCAB_SIZE

BACKENDS = ("fastattn", "torch")
MODELS = ("gpt", "lstm")

# Per-layer KV cache of the GPT: (k, v), each [B, n_head, S, head_dim].
KVCache = list[tuple[torch.Tensor, torch.Tensor]]
LSTMState = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelConfig:
    """Everything that fixes the parameter shapes; checkpoints refuse to load into another."""

    model: str = "gpt"
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4  # gpt only
    block_size: int = 128  # gpt: longest context (learned positions); lstm: training window
    dropout: float = 0.0


class BackendUnavailableError(RuntimeError):
    """--backend fastattn asked for a function or module this fastattn build lacks."""


def _fastattn_attr(name: str):
    import fastattn

    if not hasattr(fastattn, name):
        raise BackendUnavailableError(
            f"--backend fastattn needs fastattn.{name}, which this fastattn build does not "
            "provide; use --backend torch"
        )
    return getattr(fastattn, name)


def attention_function(backend: str) -> Callable[..., torch.Tensor]:
    """The scaled_dot_product_attention of the chosen backend (torch's signature)."""
    if backend == "fastattn":
        return _fastattn_attr("scaled_dot_product_attention")
    if backend == "torch":
        return F.scaled_dot_product_attention
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, sdpa: Callable[..., torch.Tensor]):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(
                f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})"
            )
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.sdpa = sdpa

    def forward(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, L, C] -> (y [B, L, C], (k, v) [B, H, S, C/H] including the cache)."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            # Training and prefill: L == S, so torch's top-left causal mask is the usual one.
            y = self.sdpa(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            # Decoding: the new queries come after every cached key, so they see all of them.
            if L != 1:
                raise ValueError("decoding with a KV cache takes one new token at a time")
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
            y = self.sdpa(q, k, v)
        y = y.transpose(1, 2).reshape(B, L, C)
        return self.proj(y), (k, v)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, sdpa: Callable[..., torch.Tensor]):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, sdpa)
        self.ln_mlp = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, cache=None):
        attn_out, kv = self.attn(self.ln_attn(x), cache)
        x = x + attn_out
        return x + self.mlp(self.ln_mlp(x)), kv


class GPT(nn.Module):
    """A GPT-style decoder over bytes: learned positions, pre-LN blocks, tied embeddings."""

    def __init__(self, config: ModelConfig, backend: str = "fastattn"):
        super().__init__()
        self.config = config
        sdpa = attention_function(backend)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, sdpa) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # Residual projections scaled down with depth so the residual stream starts small.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """idx int64 [B, L] -> (logits [B, L, 256], the per-layer KV cache after these tokens).

        With ``cache`` (from an earlier call), idx holds the one next token of each row.
        """
        past = 0 if cache is None else cache[0][0].shape[2]
        if past + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"{past + idx.shape[1]} positions exceed block_size {self.config.block_size}"
            )
        positions = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(positions))
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        logits = F.linear(self.ln_final(x), self.token_embedding.weight)
        return logits, new_cache


class LSTMLM(nn.Module):
    """Byte embedding -> multi-layer LSTM -> linear head (tied to the embedding)."""

    def __init__(self, config: ModelConfig, backend: str = "fastattn"):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.n_embd)
        lstm_args = dict(
            input_size=config.n_embd,
            hidden_size=config.n_embd,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.lstm = nn.LSTM(**lstm_args)
        if backend == "fastattn":
            fastattn_lstm_class = _fastattn_attr("LSTM")
            # Built without touching the global RNG, then given torch's initial weights, so both
            # backends start from the same parameters and consume the same random numbers.
            with torch.random.fork_rng(devices=[]):
                fastattn_lstm = fastattn_lstm_class(**lstm_args)
            fastattn_lstm.load_state_dict(self.lstm.state_dict())
            self.lstm = fastattn_lstm
        elif backend != "torch":
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.ln_final = nn.LayerNorm(config.n_embd)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(
        self, idx: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """idx int64 [B, L] -> (logits [B, L, 256], (h, c) each [n_layer, B, n_embd])."""
        out, state = self.lstm(self.token_embedding(idx), state)
        return F.linear(self.ln_final(out), self.token_embedding.weight), state


def build_model(config: ModelConfig, backend: str) -> nn.Module:
    if config.model == "gpt":
        return GPT(config, backend)
    if config.model == "lstm":
        return LSTMLM(config, backend)
    raise ValueError(f"model must be one of {MODELS}, got {config.model!r}")


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy in nats; logits [B, L, 256], targets int64 [B, L]."""
    return F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), targets.reshape(-1))
