"""README.md's results section is generated (benchmarks/readme.py) from trusted committed runs."""

import json

import pytest
from bench_records import attention_record, interleaved_rounds

from benchmarks import readme, report

QUIET = {
    "noisy": False,
    "reasons": [],
    "changes": {"gemm_fp32_gflops": 0.02, "copy_gbps": 0.03},
    "others": {"others_mean": 0.01, "others_max_window": 0.02},
}


def test_readme_results_section_is_what_the_command_writes():
    text = readme.README.read_text()
    assert readme.BEGIN in text and readme.END in text
    assert text == readme.splice(text, readme.render()), (
        "README.md's results section is stale: run `python -m benchmarks.report --readme`"
    )


def _run(root, machine, folder, when, torch_s, noise=QUIET, clean=True, trainer=None,
         grid="quick", command=None):
    path = root / machine / folder
    path.mkdir(parents=True)
    facts = {
        "machine": machine,
        "cpu_model": "Test CPU",
        "cores": 2,
        "grid": grid,
        "bench_device": "cpu",
        "torch": "2.13.0",
        "git_commit": "0123456789abcdef" + ("" if clean else "-dirty"),
        "git_head": "0123456789abcdef",
        "git_clean": clean,
        "bf16_hardware": False,
        "cpu_isa": "avx2",
    }
    results = {
        "datetime": when,
        "machine_info": {"fastattn": facts},
        "benchmarks": [
            attention_record("fastattn[cpu]", "fastattn", 0.001),
            attention_record("fastattn[reference]", "fastattn", 0.1),
            attention_record("torch.sdpa", "torch", 0.002,
                             interleaved=interleaved_rounds(0.001, torch_s)),
            attention_record("torch.eager", "torch", 0.004,
                             interleaved=interleaved_rounds(0.001, 4 * torch_s)),
        ],
    }
    if noise is not None:
        results["fastattn_noise"] = noise
    (path / "results.json").write_text(json.dumps(results))
    if command is not None:
        (path / "command.txt").write_text(command + "\n")
    if trainer is not None:
        (path / "trainer").mkdir()
        (path / "trainer" / "trainer.json").write_text(json.dumps(trainer))
    return path


def _trainer(noisy_torch=False):
    def run(backend, wall, rate, val, noisy):
        return {
            "command": f"python -m fastattn.lm train --backend {backend} --out-dir runs/{backend}",
            "steps": 1000,
            "wall_s": wall,
            "tokens_per_s_median": rate,
            "tokens_per_s_spread": 0.03,
            "val_bpb": val,
            "noise": {"noisy": noisy, "reasons": ["other processes used 40%"] if noisy else []},
        }

    return {
        "command": "python -m fastattn.lm train",
        "runs": {
            "fastattn": run("fastattn", 120.0, 3000.0, 2.351, False),
            "torch": run("torch", 150.0, 2400.0, 2.349, noisy_torch),
        },
    }


def test_newest_quiet_clean_run_per_machine_feeds_the_table(tmp_path):
    _run(tmp_path, "cpu-a-2c", "2026-12-01-0123456789ab", "2026-12-01T01:00", 0.0015,
         trainer=_trainer())
    _run(tmp_path, "cpu-a-2c", "2026-12-02-0123456789ab", "2026-12-02T01:00", 0.009,
         noise={"noisy": True, "reasons": ["copy_gbps went from 20 to 10"]})
    _run(tmp_path, "cpu-a-2c", "2026-12-03-0123456789ab-dirty", "2026-12-03T01:00", 0.009,
         clean=False)
    _run(tmp_path, "cpu-a-2c", "2026-11-30", "2026-11-30T01:00", 0.009, noise=None)
    text = readme.render(tmp_path)
    section = text[text.index("### cpu-a-2c") :]
    assert "2026-12-01-0123456789ab/report.md" in section  # not the newer noisy or dirty runs
    assert "### cpu-a-2c: Test CPU (avx2), 2 cores (no bf16 hardware" in section
    # vs the fastest (sdpa, interleaved medians 1.5 ms / 1 ms), and each baseline by name
    row = "| Attention (fwd, fwd+bwd): fwd | `fastattn[cpu]` | 1 | 1.50× | 1.50× | 1.50× ("
    assert row in section
    assert "torch.eager 6.00×, torch.sdpa 1.50×" in section
    assert "fastattn[reference]" not in section  # the oracle backend is no product
    assert (
        "took 120 s with `--backend fastattn` (3,000 tokens/s, 2.351 validation bits per byte) "
        "and 150 s with `--backend torch` (2,400 tokens/s, 2.349 validation bits per byte); "
        "fastattn's tokens/s are 1.25× torch's" in section
    )


def test_machine_without_a_trusted_run_is_listed_with_why(tmp_path):
    _run(tmp_path, "cpu-b-4c", "2026-12-01-0123456789ab-dirty", "2026-12-01T01:00", 0.002,
         clean=False)
    _run(tmp_path, "cpu-b-4c", "2026-11-30", "2026-11-30T01:00", 0.002, noise=None)
    _run(tmp_path, "cpu-b-4c", "2026-12-02-0123456789ab", "2026-12-02T01:00", 0.002,
         noise={"noisy": True, "reasons": ["other processes used 80% of the CPU"]})
    section = readme.render(tmp_path)
    assert "### cpu-b-4c" in section and "No trustworthy quick-grid run yet" in section
    assert "`2026-12-01-0123456789ab-dirty`: measured on a dirty tree" in section
    assert "`2026-11-30`: it predates the noise guard" in section
    assert "`2026-12-02-0123456789ab`: noisy: other processes used 80% of the CPU" in section
    assert "|" not in section  # no table from an untrusted run


def test_noisy_trainer_gives_no_trainer_figures(tmp_path):
    path = _run(tmp_path, "cpu-c-2c", "r", "2026-12-01T01:00", 0.002,
                trainer=_trainer(noisy_torch=True))
    run = readme.Run(path, json.loads((path / "results.json").read_text()))
    sentence = readme.trainer_sentence(run)
    assert "noisy" in sentence and "--backend torch: other processes used 40%" in sentence
    assert "tokens/s" not in sentence


def test_readme_check_reports_a_stale_section(tmp_path, monkeypatch):
    monkeypatch.setattr(readme, "render", lambda: f"{readme.BEGIN}\nfresh\n{readme.END}")
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\n{readme.BEGIN}\nstale\n{readme.END}\n\nafter\n")
    assert readme.main(check=True, path=path) == 1
    assert readme.main(path=path) == 0
    assert path.read_text() == f"# x\n\n{readme.BEGIN}\nfresh\n{readme.END}\n\nafter\n"
    assert readme.main(check=True, path=path) == 0
    path.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        readme.main(path=path)


def test_report_links_the_trainer_evidence_into_the_run_folder(tmp_path):
    source = _run(tmp_path / "src", "cpu-d-2c", "r", "2026-12-01T01:00", 0.002)
    trainer = tmp_path / "trainer"
    for backend in ("fastattn", "torch"):
        (trainer / backend).mkdir(parents=True)
        (trainer / backend / "metrics.jsonl").write_text('{"step": 1}\n')
        (trainer / backend / "ckpt.pt").write_bytes(b"big")
    (trainer / "trainer.json").write_text(json.dumps(_trainer()))
    out = report.write_report([source / "results.json"], tmp_path / "out", trainer)
    assert (out / "trainer" / "torch" / "metrics.jsonl").exists()
    assert not (out / "trainer" / "torch" / "ckpt.pt").exists()  # checkpoints stay out
    text = (out / "report.md").read_text()
    assert "## Reference trainer (default run)" in text and "| torch | 1000 | 150 |" in text
    assert "noise guard: QUIET" in text
    assert (out / "command.txt").read_text().splitlines() == [
        "not recorded",
        "python -m fastattn.lm train --backend fastattn --out-dir runs/fastattn",
        "python -m fastattn.lm train --backend torch --out-dir runs/torch",
    ]


def test_full_grid_run_is_shown_below_the_quick_one_never_in_its_place(tmp_path):
    selection = "python -m pytest benchmarks/bench_lstm.py --benchmark-only --shapes=full -k lstm"
    _run(tmp_path, "cpu-c-2c", "2026-12-01-0123456789ab", "2026-12-01T01:00", 0.0015)
    _run(tmp_path, "cpu-c-2c", "2026-12-02-0123456789ab-full", "2026-12-02T01:00", 0.003,
         grid="full", command=selection)
    _run(tmp_path, "cpu-c-2c", "2026-12-03-0123456789ab-full", "2026-12-03T01:00", 0.009,
         grid="full", noise={"noisy": True, "reasons": ["copy_gbps went from 20 to 10"]})
    text = readme.render(tmp_path)
    section = text[text.index("### cpu-c-2c") :]
    quick, full = section.split("#### cpu-c-2c: full grid")
    assert "2026-12-01-0123456789ab/report.md" in quick and "-full/" not in quick
    assert "| 1.50× | 1.50× | 1.50× (" in quick  # the quick run's ratios (sdpa 1.5 ms / 1 ms)
    assert f"`{selection}`" in full
    assert "2026-12-02-0123456789ab-full/report.md" in full  # not the newer noisy one
    assert "| 3.00× | 3.00× | 3.00× (" in full


def test_full_grid_run_without_a_quick_one(tmp_path):
    _run(tmp_path, "cpu-d-2c", "2026-12-02-0123456789ab-full", "2026-12-02T01:00", 0.003,
         grid="full")
    section = readme.render(tmp_path)
    assert "No trustworthy quick-grid run yet: the next quiet" in section
    assert "#### cpu-d-2c: full grid" in section and "an unrecorded command" in section


def test_run_folder_names_the_grid_unless_quick():
    def merged(grid):
        facts = {"git_head": "0123456789abcdef", "git_clean": True, "grid": grid}
        return {"datetime": "2026-12-05T01:00", "machine_info": {"fastattn": facts}}

    assert report.run_folder_name(merged("quick")) == "2026-12-05-0123456789ab"
    assert report.run_folder_name(merged("full")) == "2026-12-05-0123456789ab-full"
