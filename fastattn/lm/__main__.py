"""`python -m fastattn.lm {train,eval,sample}` (console script: fastattn-lm)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastattn.lm.checkpoint import CheckpointError
from fastattn.lm.model import BACKENDS, MODELS, BackendUnavailableError

_EXAMPLES = """examples:
  fastattn-lm train                                  # GPT on this Python's stdlib, runs/gpt/
  fastattn-lm train --model lstm --backend torch     # the same LSTM LM on nn.LSTM
  fastattn-lm train --resume                         # continue runs/gpt/ exactly
  fastattn-lm train --preset gpu --data corpus/      # a bigger model on your text files
  torchrun --nproc_per_node=2 -m fastattn.lm train   # DDP: gloo on CPU, nccl on GPU
  fastattn-lm eval --checkpoint runs/gpt/ckpt.pt
  fastattn-lm sample --checkpoint runs/gpt/ckpt.pt --prompt "def " --tokens 300
"""
_CHOICES = {"model": MODELS, "backend": BACKENDS, "dtype": ("float32", "bfloat16")}
_HELP = {
    "data": "text file or folder of text files (default: this Python's stdlib .py sources)",
    "out_dir": "where checkpoint, metrics.jsonl and loss.png go (default: runs/<model>)",
    "resume": "continue from <out-dir>/ckpt.pt exactly where it stopped",
    "overwrite": "start a fresh run even if <out-dir> holds a checkpoint",
    "block_size": "context length in bytes",
    "grad_accum": "micro-batches per optimizer step",
    "grad_clip": "max gradient norm (0: off)",
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from fastattn.lm.train import PRESETS, config_fields

    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="cpu: the default 2-core run (< 5 min); gpu: a bigger model")
    for field in config_fields():
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kwargs = dict(default=argparse.SUPPRESS, dest=field.name)
        help_text = _HELP.get(field.name, "")
        kwargs["help"] = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str if default is None else type(default)
            if field.name in _CHOICES:
                kwargs["choices"] = _CHOICES[field.name]
        parser.add_argument(flag, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattn-lm",
        description="Train, evaluate and sample byte-level GPT/LSTM language models.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_flags(commands.add_parser("train", help="train (or --resume) a model"))

    ev = commands.add_parser("eval", help="validation bits per byte of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="default: the data the checkpoint trained on")
    ev.add_argument("--eval-batches", type=int, default=None, help="default: the training run's")
    ev.add_argument("--batch-size", type=int, default=None, help="default: the training run's")

    sp = commands.add_parser("sample", help="generate text from a checkpoint")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--prompt", default="def ")
    sp.add_argument("--tokens", type=int, default=300, help="bytes to generate")
    sp.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    sp.add_argument("--top-k", type=int, default=50, help="0: no top-k cut")
    sp.add_argument("--seed", type=int, default=0)
    for sub in (ev, sp):
        sub.add_argument("--backend", choices=BACKENDS, default="fastattn")
        sub.add_argument("--device", default="auto")
        sub.add_argument("--dtype", choices=_CHOICES["dtype"], default="float32")
    return parser


def _configs(args: argparse.Namespace):
    from fastattn.lm.train import build_configs

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "preset")}
    return build_configs(args.preset, overrides)


def parse_train_configs(argv: Sequence[str]):
    """The (ModelConfig, TrainConfig) that `train <argv>` would run with."""
    return _configs(_parser().parse_args(["train", *argv]))


def _train(args: argparse.Namespace) -> int:
    from fastattn.lm.train import train

    summary = train(*_configs(args))
    print(json.dumps(summary))
    if summary["interrupted"]:
        print(f"fastattn-lm: stopped at step {summary['step']}; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


def _eval(args: argparse.Namespace) -> int:
    import math

    import torch
    import torch.nn.functional as F

    from fastattn.lm.data import eval_batches, load_corpus
    from fastattn.lm.sample import load_model
    from fastattn.lm.train import _autocast, _resolve_device

    device = _resolve_device(args.device, 0)
    model, state = load_model(args.checkpoint, args.backend, device)
    run = state["train_config"]
    data = args.data if args.data is not None else run["data"]
    corpus = load_corpus(data, run["val_fraction"])
    batches = eval_batches(
        corpus.val, args.batch_size or run["batch_size"], model.config.block_size,
        args.eval_batches or run["eval_batches"], 0, 1,
    )
    nats, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            with _autocast(device, args.dtype):
                logits, _ = model(x.to(device))
            nats += F.cross_entropy(logits.float().reshape(-1, 256), y.to(device).reshape(-1),
                                    reduction="sum").item()
            count += y.numel()
    print(json.dumps({"checkpoint": args.checkpoint, "step": state["step"],
                      "val_bpb": nats / count / math.log(2), "bytes": count}))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from fastattn.lm.sample import generate, load_model
    from fastattn.lm.train import _autocast, _resolve_device

    if args.tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise ValueError("--tokens, --temperature and --top-k must be >= 0")
    device = _resolve_device(args.device, 0)
    model, _ = load_model(args.checkpoint, args.backend, device)
    prompt = args.prompt.encode()
    with _autocast(device, args.dtype):
        text = generate(model, prompt, args.tokens, args.temperature, args.top_k or None, args.seed)
    sys.stdout.write((prompt + text).decode("utf-8", errors="replace") + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (2: bad input, 130: stopped by Ctrl-C)."""
    args = _parser().parse_args(argv)
    command = {"train": _train, "eval": _eval, "sample": _sample}[args.command]
    try:
        return command(args)
    except (ValueError, FileNotFoundError, CheckpointError, BackendUnavailableError) as e:
        print(f"fastattn-lm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastattn-lm: aborted; the last checkpoint written is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
