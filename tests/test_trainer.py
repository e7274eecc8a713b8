"""The reference LM trainer (fastattn.lm), driven through its CLI entry point main(argv)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn.lm import checkpoint
from fastattn.lm.__main__ import main, parse_train_configs
from fastattn.lm.data import load_corpus, stdlib_root
from fastattn.lm.model import ModelConfig, build_model
from fastattn.lm.sample import generate
from fastattn.lm.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tiny shapes so 20 steps take about a second; odd sizes on purpose (head dim 12).
TINY = {
    "gpt": ["--model", "gpt", "--n-layer", "2", "--n-embd", "24", "--n-head", "2"],
    "lstm": ["--model", "lstm", "--n-layer", "2", "--n-embd", "24"],
}
RUN = ["--block-size", "33", "--batch-size", "3", "--max-steps", "20", "--warmup-steps", "5",
       "--eval-interval", "10", "--eval-batches", "2", "--ckpt-interval", "10", "--no-progress"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A small folder of real Python sources (a few stdlib modules) plus a nested one."""
    root = tmp_path_factory.mktemp("text")
    for name in ("argparse.py", "bisect.py", "colorsys.py", "textwrap.py", "shlex.py"):
        (root / name).write_bytes((stdlib_root() / name).read_bytes())
    (root / "pkg").mkdir()
    (root / "pkg" / "heapq.py").write_bytes((stdlib_root() / "heapq.py").read_bytes())
    return root


def _train(out: Path, data: Path, *extra: str, model: str = "gpt") -> int:
    return main(["train", *TINY[model], *RUN, "--data", str(data), "--out-dir", str(out), *extra])


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(out / "ckpt.pt")["model"]


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_fastattn_and_torch_backends_train_identically(model, tmp_path, text_dir):
    assert _train(tmp_path / "torch", text_dir, "--backend", "torch", model=model) == 0
    assert _train(tmp_path / "fastattn", text_dir, "--backend", "fastattn", model=model) == 0
    torch_losses, fastattn_losses = _losses(tmp_path / "torch"), _losses(tmp_path / "fastattn")
    assert sorted(torch_losses) == list(range(1, 21))
    assert sorted(fastattn_losses) == list(range(1, 21))
    for step in range(1, 21):
        assert fastattn_losses[step] == pytest.approx(torch_losses[step], rel=1e-4), step
    # The run must have learned something, or equal losses would prove little.
    assert torch_losses[20] < torch_losses[1] - 0.5


def test_backends_start_from_identical_weights():
    for model in ("gpt", "lstm"):
        config = ModelConfig(model=model, n_layer=2, n_embd=24, n_head=2, block_size=33)
        torch.manual_seed(3)
        reference = build_model(config, "torch").state_dict()
        torch.manual_seed(3)
        candidate = build_model(config, "fastattn").state_dict()
        assert reference.keys() == candidate.keys()
        for name in reference:
            assert torch.equal(reference[name], candidate[name]), (model, name)


@pytest.mark.parametrize("kind,projections", [("gpt", 2 * 4 + 1), ("lstm", 2 + 1)])
def test_fastattn_backend_projects_through_fastattn_linear(kind, projections, monkeypatch):
    """--backend fastattn runs every projection (the GPT's four per block, the LSTM layers' input
    projections, which a batch of 3 trains with the CPU lanes along the units, and both models'
    tied head) through fastattn.ops.linear, which picks fastattn's GEMM or F.linear; --backend
    torch none of them."""
    import fastattn.ops.linear as linear_module

    calls = []
    real = linear_module.linear

    def recording(input, weight, bias=None):
        calls.append(tuple(weight.shape))
        return real(input, weight, bias)

    monkeypatch.setattr(linear_module, "linear", recording)
    config = ModelConfig(model=kind, n_layer=2, n_embd=24, n_head=2, block_size=33)
    idx = torch.randint(0, 256, (3, 33))
    build_model(config, "torch")(idx)
    assert calls == []
    build_model(config, "fastattn")(idx)
    assert len(calls) == projections and calls[-1] == (256, 24)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_fastattn_backend_model_compiles_whole_and_matches_eager(kind, inductor):
    """--compile (on in the gpu preset) compiles the model: with --backend fastattn its fastattn
    ops (attention and fastattn.ops.linear in the GPT, the LSTM and the tied head in the LSTM
    model) must compile under Inductor without a graph break and give eager's logits and
    gradients."""
    config = ModelConfig(model=kind, n_layer=2, n_embd=24, n_head=2, block_size=33)
    model = build_model(config, "fastattn")
    idx, targets = torch.randint(0, 256, (3, 33)), torch.randint(0, 256, (3, 33))
    params = list(model.parameters())

    def logits_and_grads(forward):
        logits = forward(idx)[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return [logits.detach(), *torch.autograd.grad(loss, params)]

    eager = logits_and_grads(model)
    compiled = logits_and_grads(inductor(model))
    assert len(compiled) == len(eager) == len(params) + 1
    for i, (got, want) in enumerate(zip(compiled, eager, strict=True)):
        assert not got.isnan().any(), i
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"result {i} differs")


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_resume_after_ctrl_c_matches_uninterrupted_run(model, tmp_path, text_dir):
    assert _train(tmp_path / "straight", text_dir, "--backend", "torch", model=model) == 0

    model_cfg, cfg = parse_train_configs([
        *TINY[model], *RUN, "--backend", "torch", "--data", str(text_dir),
        "--out-dir", str(tmp_path / "split"),
    ])

    def ctrl_c_at_step_10(step: int) -> None:
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(model_cfg, cfg, on_step=ctrl_c_at_step_10)
    assert summary["interrupted"] and summary["step"] == 10
    assert checkpoint.load(tmp_path / "split" / "ckpt.pt")["step"] == 10
    assert _train(tmp_path / "split", text_dir, "--backend", "torch", "--resume", model=model) == 0

    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert split == straight  # every step's loss, bit for bit, with no duplicated steps
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained_dir(tmp_path, text_dir) -> Path:
    """A finished tiny GPT run: <dir>/ckpt.pt at step 20."""
    out = tmp_path / "run"
    assert _train(out, text_dir, "--backend", "torch") == 0
    return out


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "empty_file", "empty_folder", "binary_file",
                                  "binary_only_folder"])
def test_bad_data_paths_fail_clearly_and_keep_the_checkpoint(kind, tmp_path, trained_dir, capsys):
    path = tmp_path / "data"
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "empty_folder":
        path.mkdir()
    elif kind == "binary_file":
        path.write_bytes(b"print('hi')\n\0\1\2" * 50)
    elif kind == "binary_only_folder":
        path.mkdir()
        (path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    before = (trained_dir / "ckpt.pt").read_bytes()
    message = {
        "missing": "no such file or folder",
        "empty_file": "is empty",
        "empty_folder": "holds no text files",
        "binary_file": "looks binary",
        "binary_only_folder": "1 binary files skipped",
    }[kind]
    fresh = tmp_path / "fresh"
    for out, extra in ((fresh, []), (trained_dir, ["--resume"]), (trained_dir, ["--overwrite"])):
        err = _error(capsys, ["train", *TINY["gpt"], *RUN, "--backend", "torch",
                              "--data", str(path), "--out-dir", str(out), *extra])
        assert str(path) in err and message in err, err
    assert (trained_dir / "ckpt.pt").read_bytes() == before
    assert not fresh.exists()


def test_data_folder_too_short_for_block_size(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("y = 2\n")
    err = _error(capsys, ["train", *TINY["gpt"], *RUN, "--backend", "torch", "--data",
                          str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert "--block-size" in err
    assert not (tmp_path / "out").exists()


def test_split_is_by_file_and_deterministic(text_dir):
    first, second = load_corpus(text_dir), load_corpus(text_dir)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    files = sorted(text_dir.rglob("*.py"))
    total = sum(f.stat().st_size + 1 for f in files)  # each file is followed by a newline
    assert len(first.train) + len(first.val) == total
    val_text = bytes(first.val.numpy())
    val_files = [f for f in files if f.read_bytes() in val_text]
    assert val_files and len(val_files) < len(files)
    assert all(f.read_bytes() not in bytes(first.train.numpy()) for f in val_files)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_checkpoint"])
def test_corrupt_checkpoint_fails_clearly_and_is_left_alone(damage, trained_dir, text_dir, capsys):
    ckpt = trained_dir / "ckpt.pt"
    if damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        torch.save({"weights": torch.ones(3)}, ckpt)
    before = ckpt.read_bytes()
    expected = "not a fastattn-lm checkpoint"
    err = _error(capsys, ["train", *TINY["gpt"], *RUN, "--backend", "torch", "--data",
                          str(text_dir), "--out-dir", str(trained_dir), "--resume"])
    assert str(ckpt) in err and expected in err, err
    for command in (["eval"], ["sample", "--tokens", "5"]):
        err = _error(capsys, [*command, "--checkpoint", str(ckpt), "--backend", "torch"])
        assert str(ckpt) in err and expected in err, err
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("change", [["--n-embd", "32"], ["--n-layer", "3"], ["--block-size", "40"],
                                    TINY["lstm"]])
def test_checkpoint_of_another_model_config_is_refused(change, trained_dir, text_dir, capsys):
    ckpt = trained_dir / "ckpt.pt"
    before = ckpt.read_bytes()
    argv = ["train", *TINY["gpt"], *RUN, "--backend", "torch", "--data", str(text_dir),
            "--out-dir", str(trained_dir), "--max-steps", "30", *change]
    err = _error(capsys, [*argv, "--resume"])
    assert "another model config" in err, err
    changed = change[0][2:].replace("-", "_")
    assert changed in err, err
    # A fresh run must not silently replace the existing checkpoint either.
    err = _error(capsys, argv)
    assert "already holds a checkpoint" in err, err
    assert ckpt.read_bytes() == before


def test_eval_reproduces_the_training_runs_validation_figure(trained_dir, capsys):
    assert main(["eval", "--checkpoint", str(trained_dir / "ckpt.pt"), "--backend", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 20
    saved = checkpoint.load(trained_dir / "ckpt.pt")["val_bpb"]
    assert result["val_bpb"] == pytest.approx(saved, rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "fastattn"])
def test_gpt_kv_cache_decoding_matches_full_forward(backend):
    torch.manual_seed(0)
    model = build_model(ModelConfig("gpt", n_layer=2, n_embd=24, n_head=2, block_size=33), backend)
    model.eval()
    idx = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch=2, block_size=4)  # several pages per row
        logits, _ = model(idx[:, :5], cache)
        steps = [logits]
        for t in range(5, 17):
            logits, _ = model(idx[:, t : t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 17 and cache.seqlens.tolist() == [17, 17]


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_sample_continues_the_prompt(model, tmp_path, text_dir, capsys):
    out = tmp_path / model
    assert _train(out, text_dir, "--backend", "torch", model=model) == 0
    capsys.readouterr()
    # 80 new bytes run past block_size 33, so the GPT's cache refill path runs too.
    argv = ["sample", "--checkpoint", str(out / "ckpt.pt"), "--backend", "torch",
            "--prompt", "def ", "--tokens", "80", "--seed", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ")
    assert main(argv) == 0
    assert capsys.readouterr().out == text  # seeded sampling is reproducible
    state = checkpoint.load(out / "ckpt.pt")
    model_obj = build_model(ModelConfig(**state["model_config"]), "torch")
    model_obj.load_state_dict(state["model"])
    assert len(generate(model_obj.eval(), b"def ", 80, temperature=0.8, top_k=20)) == 80


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, text_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastattn.lm", "train", *TINY["gpt"], *RUN, "--backend", "torch",
         "--data", str(text_dir), "--out-dir", str(out)],
        env=env, check=True, timeout=300, cwd=tmp_path,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    digests = [r["rank_weight_sha256"] for r in records if "rank_weight_sha256" in r]
    assert len(digests) == 1 and len(digests[0]) == 2 and digests[0][0] == digests[0][1]
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] == 20 and len(state["sampler"]) == 2
    # The two ranks read different shards, so their data positions differ.
    assert not torch.equal(state["sampler"][0]["generator"], state["sampler"][1]["generator"])
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 21))


@pytest.mark.parametrize("backend", ["torch", "fastattn"])
def test_bf16_autocast_with_gradient_accumulation_trains(backend, tmp_path, text_dir):
    out = tmp_path / "bf16"
    assert _train(out, text_dir, "--backend", backend, "--dtype", "bfloat16", "--grad-accum", "2",
                  "--max-steps", "6", "--eval-interval", "6") == 0
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert checkpoint.load(out / "ckpt.pt")["val_bpb"] < 8.5  # finite, not diverged (uniform is 8)
