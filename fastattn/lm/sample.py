"""Text generation from a trained checkpoint: KV cache for the GPT, carried state for the LSTM."""

from __future__ import annotations

import torch
from torch import nn

from fastattn.lm import checkpoint
from fastattn.lm.model import GPT, ModelConfig, build_model


def load_model(path: str, backend: str, device: torch.device) -> tuple[nn.Module, dict]:
    """The model stored in a trainer checkpoint (eval mode), and the checkpoint itself."""
    state = checkpoint.load(path)
    model = build_model(ModelConfig(**state["model_config"]), backend)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Next byte per row from logits [B, 256]: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: bytes,
    tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> bytes:
    """Continues ``prompt`` by ``tokens`` bytes.

    GPT: the prompt is run once (prefill) into a paged KV cache and each new byte then attends
    over it with a single query (attention_with_kv_cache for the fastattn backend). When the
    cache reaches block_size (learned positions end there) the last half block is re-run as a
    fresh prefill. LSTM: (h, c) carries over.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    context = list(prompt or b"\n")
    out = []
    if isinstance(model, GPT):
        block_size = model.config.block_size
        window = context[-block_size:]
        cache = model.new_kv_cache(batch=1)
        logits, _ = model(torch.tensor([window], device=device), cache)
        for _ in range(tokens):
            next_byte = _pick(logits[:, -1], temperature, top_k, generator)
            out.append(int(next_byte))
            if cache.length == block_size:
                window = (context + out)[-(block_size // 2):]
                cache.reset()
                logits, _ = model(torch.tensor([window], device=device), cache)
            else:
                logits, _ = model(next_byte, cache)
    else:
        logits, state = model(torch.tensor([context], device=device))
        for _ in range(tokens):
            next_byte = _pick(logits[:, -1], temperature, top_k, generator)
            out.append(int(next_byte))
            logits, state = model(next_byte, state)
    return bytes(out)
