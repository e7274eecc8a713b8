"""Training and evaluation loops of the reference trainer (single process or torchrun DDP)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastattn.lm import checkpoint
from fastattn.lm.data import BatchSampler, eval_batches, load_corpus, shard
from fastattn.lm.model import ModelConfig, build_model, loss_fn

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


@dataclass
class TrainConfig:
    """Everything about a run that is not the model's shape. Defaults: the 2-core CPU preset."""

    backend: str = "fastattn"  # fastattn | torch
    data: str | None = None  # text file or folder; None: this interpreter's stdlib sources
    val_fraction: float = 0.05
    out_dir: str | None = None  # None: runs/<model>
    seed: int = 1337
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 200
    eval_batches: int = 16
    ckpt_interval: int = 250
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


# Overrides applied on top of the dataclass defaults (explicit flags override a preset).
PRESETS: dict[str, dict] = {
    "cpu": {},
    "gpu": dict(
        n_layer=8, n_embd=512, n_head=8, block_size=512, batch_size=64, max_steps=5000,
        lr=1e-3, min_lr=1e-4, warmup_steps=200, eval_interval=500, eval_batches=50,
        ckpt_interval=1000, dtype="bfloat16", compile=True,
    ),
}


def out_dir_for(model_cfg: ModelConfig, cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / model_cfg.model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@dataclass
class _Processes:
    """Where this process sits in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def _processes(device_name: str) -> Iterator[_Processes]:
    """Joins the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_name, local_rank)
    if world_size == 1:
        yield _Processes(0, 1, device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield _Processes(dist.get_rank(), world_size, device)
        # Tearing gloo down needs every rank: one that reaches destroy_process_group while
        # another is still busy (rank 0 plotting) can wait there forever once the other exits.
        dist.barrier()
        # Then a pause without the GIL: a gloo worker frees each finished collective (this
        # barrier holds the last one, the gather of the ranks' weight digests, whose tensors
        # have Python objects) and needs the GIL to do it. Had the main thread meanwhile
        # dropped the DDP model, the group's destructor would join that worker while holding
        # the GIL: a deadlock seen in one CI run (torch 2.13, gloo), a rank stuck at exit after
        # its training had finished.
        time.sleep(0.1)
    finally:
        dist.destroy_process_group()


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to checkpoint and stop after the current step.

    The step finishes first so the checkpoint is consistent (never a half-applied optimizer
    step). A second Ctrl-C aborts at once, keeping the last checkpoint written. SIGTERM is
    what torchrun sends its workers when it is interrupted, and what schedulers send on
    preemption.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nfastattn-lm: {signal.Signals(signum).name}: saving a checkpoint after this step"
            " (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __enter__(self):
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only (not on biases, LayerNorm gains or LSTM bias vectors).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")


@torch.no_grad()
def evaluate(model: nn.Module, batches, device, dtype: str, procs: _Processes) -> float:
    """Validation bits per byte: summed cross entropy (nats) over all ranks' bytes / ln 2."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [nats, bytes]
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, dtype):
            logits, _ = model(x)
        totals[0] += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").double()
        totals[1] += y.numel()
    procs.all_reduce_sum(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item() / math.log(2)


def _write_metrics(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path) -> None:
    """Train loss and validation bits per byte against step, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"] / math.log(2)) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    model_cfg: ModelConfig, cfg: TrainConfig, on_step: Callable[[int], None] | None = None
) -> dict:
    """Trains (or resumes) a model; returns {"step", "train_loss", "val_bpb", "interrupted"}.

    ``on_step(step)`` is called after each completed optimizer step (tests use it to interrupt).
    Checkpoints go to <out_dir>/ckpt.pt every ckpt_interval steps, at the end and on Ctrl-C.
    """
    out_dir = out_dir_for(model_cfg, cfg)
    ckpt_path = out_dir / CHECKPOINT_NAME
    # Every check that can refuse the run happens before anything is written.
    resumed = None
    if cfg.resume:
        resumed = checkpoint.load(ckpt_path)
        checkpoint.check_model_config(resumed["model_config"], asdict(model_cfg), ckpt_path)
    elif ckpt_path.exists() and not cfg.overwrite:
        raise checkpoint.CheckpointError(
            f"{str(out_dir)!r} already holds a checkpoint; pass --resume to continue it, "
            "--overwrite to start over, or another --out-dir"
        )
    corpus = load_corpus(cfg.data, cfg.val_fraction)

    with _processes(cfg.device) as procs, _StopRequest() as stop:
        if resumed is not None and len(resumed["sampler"]) != procs.world_size:
            raise checkpoint.CheckpointError(
                f"checkpoint {str(ckpt_path)!r} was written by {len(resumed['sampler'])} "
                f"processes; resume it with the same --nproc_per_node x nodes"
            )
        torch.manual_seed(cfg.seed)
        raw_model = build_model(model_cfg, cfg.backend).to(procs.device)
        optimizer = _optimizer(raw_model, cfg)
        sampler = BatchSampler(
            shard(corpus.train, procs.rank, procs.world_size),
            cfg.batch_size, model_cfg.block_size, seed=cfg.seed + 1000 * (procs.rank + 1),
        )
        val_batches = eval_batches(
            corpus.val, cfg.batch_size, model_cfg.block_size, cfg.eval_batches,
            procs.rank, procs.world_size,
        )
        # Dropout masks differ per rank; the init above is the same on every rank.
        torch.manual_seed(cfg.seed + procs.rank)
        start_step = 0
        if resumed is not None:
            raw_model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            sampler.load_state_dict(resumed["sampler"][procs.rank])
            checkpoint.set_rng_state(resumed["rng"][procs.rank])
            start_step = resumed["step"]
        model = raw_model
        if cfg.compile:
            model = torch.compile(model)
        if procs.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None
            )

        metrics_path = out_dir / METRICS_NAME
        records = []
        if procs.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            # Steps after the resumed checkpoint were lost with the interruption: drop their logs.
            if resumed is not None:
                records = [r for r in _read_metrics(metrics_path) if r["step"] <= start_step]
            _write_metrics(metrics_path, records)
            n_params = sum(p.numel() for p in raw_model.parameters())
            start = f"resuming at step {start_step}" if resumed else "fresh"
            print(
                f"fastattn-lm: {model_cfg.model} ({n_params:,} params, backend {cfg.backend}) "
                f"on {corpus}, {procs.world_size} process(es) on {procs.device}; {start} "
                f"-> {out_dir}",
                file=sys.stderr,
            )

        def log(record: dict) -> None:
            if procs.is_main:
                records.append(record)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

        def save(step: int, val_bpb: float | None) -> None:
            samplers = procs.gather(sampler.state_dict())
            rngs = procs.gather(checkpoint.rng_state())
            if procs.is_main:
                checkpoint.save_atomic(
                    {
                        "model_config": asdict(model_cfg),
                        "train_config": asdict(cfg),
                        "step": step,
                        "val_bpb": val_bpb,
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "sampler": samplers,
                        "rng": rngs,
                    },
                    ckpt_path,
                )

        tokens_per_step = cfg.batch_size * model_cfg.block_size * cfg.grad_accum * procs.world_size
        val_bpb = resumed.get("val_bpb") if resumed else None
        train_loss = float("nan")
        step = start_step
        bar = _progress(cfg, procs, start_step)
        model.train()
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=procs.device)
                for micro in range(cfg.grad_accum):
                    x, y = (t.to(procs.device) for t in sampler.next_batch())
                    # DDP averages gradients only on the last micro-step of an accumulation.
                    accumulating = procs.distributed and micro < cfg.grad_accum - 1
                    with model.no_sync() if accumulating else contextlib.nullcontext():
                        with _autocast(procs.device, cfg.dtype):
                            logits, _ = model(x)
                            loss = loss_fn(logits, y) / cfg.grad_accum
                        loss.backward()
                    loss_sum += loss.detach()
                grad_norm = (
                    nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip).item()
                    if cfg.grad_clip > 0 else float("nan")
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if on_step is not None:
                    on_step(step)
                # One collective carries the mean loss and whether any rank saw Ctrl-C.
                stop_flag = torch.tensor(float(stop.requested), device=procs.device)
                shared = procs.all_reduce_sum(torch.stack([loss_sum.float(), stop_flag]))
                train_loss = shared[0].item() / procs.world_size
                stopping = shared[1].item() > 0
                tokens_per_s = tokens_per_step / (time.perf_counter() - t0)
                log({"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_per_s})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    val_bpb = evaluate(raw_model, val_batches, procs.device, cfg.dtype, procs)
                    log({"step": step, "val_bpb": val_bpb})
                    if bar is not None:
                        bar.write(f"step {step}: val {val_bpb:.4f} bits/byte")
                if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stopping:
                    save(step, val_bpb)
                if stopping:
                    break
        finally:
            if bar is not None:
                bar.close()
        if procs.distributed:
            _check_ranks_agree(raw_model, procs, log)
        if procs.is_main:
            plot_losses(records, out_dir / PLOT_NAME)
        return {"step": step, "train_loss": train_loss, "val_bpb": val_bpb,
                "interrupted": step < cfg.max_steps}


def _progress(cfg: TrainConfig, procs: _Processes, start_step: int):
    if not (cfg.progress and procs.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True)


def _check_ranks_agree(model: nn.Module, procs: _Processes, log: Callable[[dict], None]) -> None:
    """Verifies every rank ended with bit-identical weights (logged, raises if not)."""
    import hashlib

    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = procs.gather(digest.hexdigest())
    log({"step": -1, "rank_weight_sha256": digests})
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")


def config_fields() -> list[dataclasses.Field]:
    """The dataclass fields that become `train` flags, model shape first."""
    return [*dataclasses.fields(ModelConfig), *dataclasses.fields(TrainConfig)]


def build_configs(preset: str, overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    """Dataclass defaults, then the preset's overrides, then the explicit flags."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **overrides}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in values.items() if k in model_names})
    cfg = TrainConfig(**{k: v for k, v in values.items() if k not in model_names})
    _validate(model_cfg, cfg)
    return model_cfg, cfg


def _validate(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    positive = dict(
        n_layer=model_cfg.n_layer, n_embd=model_cfg.n_embd, n_head=model_cfg.n_head,
        block_size=model_cfg.block_size, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, eval_interval=cfg.eval_interval,
        eval_batches=cfg.eval_batches, ckpt_interval=cfg.ckpt_interval,
    )
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if not 0.0 <= model_cfg.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {model_cfg.dropout}")
