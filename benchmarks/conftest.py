"""pytest wiring for the benchmark suite: options, grid parametrization, machine info.

    pytest benchmarks/ --benchmark-only [--shapes=quick|full] [--benchmark-json=R.json]
    pytest benchmarks/ --benchmark-disable       # smoke: tiny shapes, every case runs once

The grid comes from --shapes, else FASTATTN_BENCH_GRID, else "smoke" under
--benchmark-disable and "quick" otherwise. The device from --bench-device, else
FASTATTN_BENCH_DEVICE, else cuda when available.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness, shapes


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastattn benchmarks")
    group.addoption(
        "--shapes",
        choices=shapes.GRIDS,
        default=None,
        help="shape grid (default: FASTATTN_BENCH_GRID, else smoke under --benchmark-disable, "
        "else quick)",
    )
    group.addoption(
        "--bench-device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="device to benchmark on (default: FASTATTN_BENCH_DEVICE, else cuda when available)",
    )


def pytest_collect_file(file_path, parent):
    # Benchmark files are bench_*.py, which pytest's default python_files would not collect.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):  # named on the command line: pytest collects it
            return None
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Roofline first (every case reports its efficiency against it); then, per test function,
    all providers of one (shape, dtype, pass) next to each other, smallest shapes first, so a
    run cut short by a time limit still has fastattn and its torch baselines side by side."""
    grid = harness.session_of(config).grid
    first_seen: dict[tuple[str, str], int] = {}
    for item in items:
        first_seen.setdefault((str(item.path), item.originalname), len(first_seen))

    def position(item: pytest.Item, suffix: str) -> list[int]:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        return [
            getattr(grid, _GRID_PARAMS[name]).index(value)
            for name, value in params.items()
            if name.endswith(suffix) and name in _GRID_PARAMS
        ]

    def order(item: pytest.Item) -> tuple:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        return (
            item.originalname != "test_roofline",
            first_seen[(str(item.path), item.originalname)],
            position(item, "_shape"),
            position(item, "_dtype"),
            params.get("pass_", ""),
        )

    items.sort(key=order)


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> harness.BenchSession:
    return harness.session_of(request.config)


_GRID_PARAMS = {
    "attention_shape": "attention",
    "decode_shape": "attention_decode",
    "attention_dtype": "attention_dtypes",
    "varlen_shape": "attention_varlen",
    "paged_shape": "attention_paged_decode",
    "window_shape": "attention_window",
    "features_dtype": "attention_features_dtypes",
    "lstm_cell_shape": "lstm_cell",
    "lstm_shape": "lstm",
    "lstm_dtype": "lstm_dtypes",
    "mha_shape": "mha",
    "encoder_shape": "encoder",
    "mha_dtype": "mha_dtypes",
}


def _param_id(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return getattr(value, "id", str(value))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    grid = harness.session_of(metafunc.config).grid
    for fixture, attribute in _GRID_PARAMS.items():
        if fixture in metafunc.fixturenames:
            values = getattr(grid, attribute)
            metafunc.parametrize(fixture, values, ids=[_param_id(v) for v in values])


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = harness.session_of(config)
    facts = session.facts
    return [
        f"fastattn benchmarks: grid={session.grid.name} device={session.device} "
        f"machine={facts['machine']} torch={facts['torch']} triton={facts['triton']} "
        f"commit={facts['git_commit']}",
        "fastattn backends: "
        + ", ".join(f"{k}={v}" for k, v in facts["fastattn_backends"].items()),
    ] + [f"grid note: {note}" for note in session.grid.notes]


_SKIPPED: list[dict[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _SKIPPED.append({"test": report.nodeid, "reason": reason})


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    # Skipped cases never reach pytest-benchmark's JSON; the report lists them with the reason.
    output_json["fastattn_skipped"] = list(_SKIPPED)
    # The noise guard's verdict: benchmarks/readme.py only takes runs it calls quiet.
    output_json["fastattn_noise"] = harness.session_of(config).noise_verdict()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = getattr(config, "_fastattn_bench", None)
    if session is None or session.disabled:
        return
    verdict = session.noise_verdict()
    if verdict["noisy"]:
        terminalreporter.write_line(
            "fastattn benchmarks: NOISY run (kept out of the README): "
            + "; ".join(verdict["reasons"]),
            yellow=True,
        )
    else:
        terminalreporter.write_line("fastattn benchmarks: quiet run (the noise guard found none)")


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    session = harness.session_of(config)
    machine_info["fastattn"] = dict(session.facts, grid=session.grid.name)
    if session._roofline is not None:
        machine_info["fastattn"]["roofline"] = session._roofline
