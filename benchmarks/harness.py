"""What every benchmark case shares: providers, timing, peak memory, machine facts, roofline.

A case is one (op, pass, provider, shape, dtype). ``run_case`` times it with pytest-benchmark:
random inputs (never zeros), warm-up calls excluded from the timing, the device synchronized
inside the timed call, and on a GPU several input sets rotated so that small cases are not
served from L2. It records FLOPs, bytes, rates, peak memory, machine and versions in
``benchmark.extra_info``, which ``benchmarks/report.py`` reads back. Each torch baseline is
then timed again, alternating call by call with the fastattn providers of the same case: the
ratios come from those interleaved rounds. The session's noise guard (``benchmarks/noise.py``)
judges the whole run: speed probes before and after, other processes' CPU use throughout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import fastattn
from benchmarks import noise, shapes
from fastattn import _extension
from fastattn.info import cpu_model

REPO = Path(__file__).resolve().parent.parent

# Score matrices above this many bytes (B*H*L*S fp32) are not built: providers that materialize
# them (eager, SDPA math, the reference backend) skip such shapes with this reason.
MATERIALIZE_LIMIT_BYTES = {"cpu": 1 << 30, "cuda": 16 << 30}


@dataclass(frozen=True)
class Provider:
    """One way to run an op. Ratios compare each fastattn provider with the best torch one."""

    name: str  # shown in tables, e.g. "fastattn[cpu]", "torch.sdpa[math]"
    kind: str  # "fastattn" or "torch"
    backend: str | None = None  # the fastattn backend forced for the call
    impl: str = ""  # which entry point, when one file benchmarks several (e.g. "LSTMCell")

    def __str__(self) -> str:
        return self.name


def fastattn_backend_names(device: torch.device) -> list[str]:
    """The fastattn backends that could serve ``device`` (an unusable one skips, saying why)."""
    return ["cuda", "triton", "reference"] if device.type == "cuda" else ["cpu", "reference"]


def require_backend(provider: Provider) -> None:
    if provider.backend is None:
        return
    status = fastattn.backends()[provider.backend]
    if not status.usable:
        pytest.skip(f"fastattn backend {provider.backend!r} is unavailable here: {status.reason}")


@contextlib.contextmanager
def forced_backend(provider: Provider) -> Iterator[None]:
    """Forces the provider's fastattn backend, also on autograd's device threads (the env var)."""
    if provider.backend is None:
        yield
        return
    previous = os.environ.get("FASTATTN_BACKEND")
    os.environ["FASTATTN_BACKEND"] = provider.backend
    try:
        with fastattn.use_backend(provider.backend):
            yield
    finally:
        if previous is None:
            os.environ.pop("FASTATTN_BACKEND", None)
        else:
            os.environ["FASTATTN_BACKEND"] = previous


def skip_if_materialized_too_big(provider: Provider, elements: int, device: torch.device) -> None:
    limit = MATERIALIZE_LIMIT_BYTES[device.type]
    if elements * 4 > limit:
        pytest.skip(
            f"{provider.name} materializes the {elements:,}-element score matrix "
            f"({elements * 4 / 2**30:.1f} GiB fp32 > the {limit / 2**30:.0f} GiB limit "
            f"for {device.type})"
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_tensor(
    *shape: int, device: torch.device, dtype: torch.dtype, requires_grad: bool = False
):
    """Standard normal values: random, never zeros (zeros hide unwritten outputs and run faster)."""
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def attention_call(
    fn: Callable[..., torch.Tensor], backward: bool
) -> Callable[[tuple], Callable[[], object]]:
    """make_call for an attention-like ``fn(q, k, v) -> out`` on inputs (q, k, v, dout): the
    forward under no_grad, or forward and backward to every input's gradient."""

    def make_call(inputs: tuple) -> Callable[[], object]:
        q, k, v, dout = inputs
        if backward:
            return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(q, k, v)

        return forward

    return make_call


def fastest(
    fn: Callable[[], object], reps: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds of the fastest of ``reps`` calls by ``clock``: wall time by default; the A/B
    scripts pass time.process_time on a shared machine (CPU time ignores descheduling)."""
    best = math.inf
    for _ in range(reps):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def fastest_interleaved(
    fns: list[Callable[[], object]], rounds: int, clock: Callable[[], float] = time.perf_counter,
    warm_calls: int = 0,
) -> list[float]:
    """Each function's fastest seconds by ``clock`` over ``rounds`` rounds of one call each, in
    turn: a slow spell of a shared machine then hits every candidate, not one. ``warm_calls``
    untimed calls precede each timed one, so that it finds its own operands in cache rather
    than the previous candidate's (weights of a few MB otherwise favour whichever candidate
    shares them with the one before it)."""
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(warm_calls):
                fn()
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> tuple[str, bool | None]:
    """(HEAD of this checkout, whether tracked files match it); ("unknown", None) without git.

    FASTATTN_GIT_COMMIT overrides the commit (no .git on a GPU machine); cleanliness is then
    unknown unless FASTATTN_GIT_CLEAN=1 says the copy was made from a clean tree.
    """
    if os.environ.get("FASTATTN_GIT_COMMIT"):
        return os.environ["FASTATTN_GIT_COMMIT"], (
            True if os.environ.get("FASTATTN_GIT_CLEAN") == "1" else None
        )
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head, not dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None




def bf16_hardware(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware (CPU: AVX512-BF16/AMX-BF16 on x86, the bf16
    extension on Arm). Without it torch emulates bf16 GEMMs, so their rate is no ceiling."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


def cpu_isa() -> str:
    """The ISA of fastattn's CPU kernels here (baseline, avx2, avx512), + "-amx" where the CPU
    has AMX tiles (torch's bf16 GEMMs use them). Part of the machine's name: a VM's CPU model
    ("AMD EPYC") often hides which generation, and so which of these, it is."""
    C = _extension.C
    isa = C.cpu_isa() if C is not None else "unknown"
    return isa + ("-amx" if "amx_tile" in cpu_flags() else "")


def _cpuinfo_fields(*names: str) -> dict[str, str]:
    """The first value of each named /proc/cpuinfo field that is there."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in names and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    fields = _cpuinfo_fields("flags", "Features")
    return set(fields.get("flags", fields.get("Features", "")).split())


# AMD's CPU families and model ranges of its Zen generations (the processor programming
# references; family 25 holds both Zen 3 and Zen 4).
_AMD_GENERATIONS = {
    23: [(range(0x00, 0x30), "zen1"), (range(0x30, 0x100), "zen2")],
    25: [(range(0x10, 0x20), "zen4"), (range(0x60, 0x80), "zen4"), (range(0xA0, 0xB0), "zen4"),
         (range(0x00, 0x100), "zen3")],
    26: [(range(0x00, 0x100), "zen5")],
}


def cpu_generation() -> str:
    """AMD's Zen generation of this CPU ("zen4", "zen5"; "family<N>" for a family not in the
    table), or "" for other vendors, whose model names say it. A VM's "AMD EPYC" hides it, and
    two generations with the same ISA differ in speed (Zen 5 runs AVX-512 at full width, Zen 4
    in two halves): part of the machine's name, so that their runs are not compared as one."""
    fields = _cpuinfo_fields("vendor_id", "cpu family", "model")
    if fields.get("vendor_id") != "AuthenticAMD":
        return ""
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return ""
    for models, name in _AMD_GENERATIONS.get(family, []):
        if model in models:
            return name
    return f"family{family}"


def machine_facts(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, GPU, versions and commit; ``machine`` names the results folder."""
    cpu = cpu_model()
    cores = os.cpu_count() or 1
    head, clean = git_state()
    facts: dict[str, Any] = {
        "cpu_model": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastattn": fastattn.__version__,
        "fastattn_backends": {
            name: (status.reason or "usable") for name, status in fastattn.backends().items()
        },
        "git_commit": head + ("-dirty" if clean is False else ""),
        "git_head": head,
        "git_clean": clean,
        "bf16_hardware": bf16_hardware(device),
        "cpu_isa": cpu_isa(),
        "bench_device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu"] = props.name
        facts["gpu_capability"] = f"{props.major}.{props.minor}"
        facts["gpu_sms"] = props.multi_processor_count
        facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        facts["gpu_l2_bytes"] = getattr(props, "L2_cache_size", 0)
        facts["machine"] = _slug(props.name)
    else:
        generation = cpu_generation()
        facts["cpu_generation"] = generation or None
        facts["machine"] = "-".join(
            part for part in (_slug(cpu), generation, facts["cpu_isa"], f"{cores}c") if part
        )
    return facts


def _median_seconds(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gemm_seconds(n: int, dtype: torch.dtype, device: torch.device, calls: int) -> float:
    a = random_tensor(n, n, device=device, dtype=dtype)
    b = random_tensor(n, n, device=device, dtype=dtype)
    return _median_seconds(lambda: torch.mm(a, b), device, calls)


def _copy_gbps(copy_bytes: int, device: torch.device, calls: int) -> float:
    src = random_tensor(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * copy_bytes / _median_seconds(lambda: dst.copy_(src), device, calls) / 1e9


def measure_roofline(
    device: torch.device, smoke: bool, bf16_native: bool
) -> dict[str, float | int | bool]:
    """fp32 and bf16 GEMM rate (GFLOP/s) and copy bandwidth (GB/s, read + write) on ``device``.

    Measured in the same run as the cases so every case can report its efficiency. The GEMM
    size doubles from 256 until one product takes 50 ms or n reaches the cap (CPUs without
    native bf16 run bf16 GEMMs 20x slower than fp32: a fixed size would take minutes). The
    smoke grid uses tiny sizes: its numbers only prove the code path. ``gemm_bf16_emulated``:
    no bf16 hardware, so the bf16 rate is torch's emulation, no ceiling to compare with.
    """
    max_n = 256 if smoke else (8192 if device.type == "cuda" else 2048)
    copy_bytes = (4 << 20) if smoke else ((2 << 30) if device.type == "cuda" else (256 << 20))
    calls = 3 if smoke else 5
    out: dict[str, float | int | bool] = {
        "copy_bytes": copy_bytes,
        "calls": calls,
        "smoke": smoke,
        "gemm_bf16_emulated": not bf16_native,
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 256
        while n < max_n and _gemm_seconds(n, dtype, device, calls=1) < 0.05:
            n *= 2
        out[f"gemm_{name}_n"] = n
        out[f"gemm_{name}_gflops"] = 2 * n**3 / _gemm_seconds(n, dtype, device, calls) / 1e9
    out["copy_gbps"] = _copy_gbps(copy_bytes, device, calls)
    return out


def speed_probes(roofline: dict[str, Any]) -> dict[str, float]:
    """The rates the noise guard compares before and after a run (see benchmarks/noise.py)."""
    return {name: roofline[name] for name in ("gemm_fp32_gflops", "copy_gbps")}


def measure_speed_probes(device: torch.device, roofline: dict[str, Any]) -> dict[str, float]:
    """The fp32 GEMM rate and copy bandwidth again, at the roofline's sizes (the "after" probe)."""
    n, calls = roofline["gemm_fp32_n"], roofline["calls"]
    return {
        "gemm_fp32_gflops": 2 * n**3 / _gemm_seconds(n, torch.float32, device, calls) / 1e9,
        "copy_gbps": _copy_gbps(roofline["copy_bytes"], device, calls),
    }


def gemm_rate(roofline: dict[str, Any], dtype: torch.dtype) -> float | None:
    """The measured GEMM rate a case of ``dtype`` is compared with (fp16 uses the bf16 rate);
    None where that rate is an emulation's (no bf16 hardware): a percentage of it means nothing."""
    if dtype == torch.float32:
        return roofline.get("gemm_fp32_gflops")
    if dtype in (torch.bfloat16, torch.float16) and not roofline.get("gemm_bf16_emulated"):
        return roofline.get("gemm_bf16_gflops")
    return None


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if platform.system() == "Linux" else None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Bytes the call needs above what was allocated before it, and how that was measured.

    GPU: torch's allocator peak (max_memory_allocated). CPU: the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) over the RSS before the call, after malloc_trim so
    that memory glibc kept from earlier calls has to be faulted in again and shows.
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    if _LIBC is None:
        return None, "unavailable (not Linux)"
    _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError as error:
        return None, f"unavailable ({error})"
    before = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:
        return None, "unavailable (/proc/self/status)"
    return (peak - before) * 1024, "rss high-water delta"


@dataclass
class BenchSession:
    """Per-run state: where and what to run, the machine facts, the lazily measured roofline,
    the noise guard's CPU monitor, and the fastattn calls of the case key being timed (held so
    that each torch baseline of the same key can be timed interleaved with them)."""

    device: torch.device
    grid: shapes.Grid
    disabled: bool  # --benchmark-disable: every case runs once, nothing is timed
    facts: dict[str, Any]
    monitor: noise.CpuMonitor | None = None
    _roofline: dict[str, Any] | None = None
    _noise: dict[str, Any] | None = None
    _held_key: tuple | None = None
    _held: dict[str, tuple[Provider, Callable[[], None], float]] = field(default_factory=dict)

    @property
    def roofline(self) -> dict[str, Any]:
        """The roofline of this run, measured on first use."""
        return self._roofline if self._roofline is not None else self.measure_roofline()

    def measure_roofline(self) -> dict[str, Any]:
        self._roofline = measure_roofline(
            self.device, smoke=self.grid.name == "smoke", bf16_native=self.facts["bf16_hardware"]
        )
        return self._roofline

    def noise_verdict(self) -> dict[str, Any]:
        """The noise guard's verdict on this run (benchmarks/noise.py), decided once, at the end:
        the speed probes again, compared with the roofline's, and other processes' CPU use."""
        if self._noise is not None:
            return self._noise
        if self.disabled:
            self._noise = {"noisy": True, "reasons": ["untimed run (--benchmark-disable)"]}
            return self._noise
        others = self.monitor.stop() if self.monitor is not None else {}
        before = speed_probes(self._roofline) if self._roofline is not None else None
        after = measure_speed_probes(self.device, self._roofline) if before else None
        self._noise = dict(noise.verdict(before, after, others), before=before, after=after)
        return self._noise

    def hold(self, key: tuple, provider: Provider, call: Callable[[], None], t_call: float) -> None:
        if key != self._held_key:
            self._held_key, self._held = key, {}
        self._held[provider.name] = (provider, call, t_call)

    def interleave(
        self, key: tuple, provider: Provider, call: Callable[[], None], t_call: float
    ) -> dict[str, Any]:
        """Times ``call`` (a torch baseline) alternating with each held fastattn call of ``key``.

        Per fastattn provider: the rounds and both sides' min and median seconds. Rounds fit
        the grid's time budget; the order flips every round (ABBA) so neither side always runs
        on the caches the other left. Alternating makes a change in machine speed hit both
        sides alike, which back-to-back blocks of rounds cannot promise. Each call runs under
        its own provider's forced backend, entered outside the timed region.
        """
        if key != self._held_key:
            self._held_key, self._held = key, {}
            return {}
        grid = self.grid
        out = {}
        for name, (ours_provider, ours, t_ours) in self._held.items():
            rounds = 1 if self.disabled else grid.rounds(t_ours + t_call)
            sides = [(ours_provider, ours, []), (provider, call, [])]
            for i in range(rounds):
                for side_provider, fn, times in sides[:: 1 if i % 2 == 0 else -1]:
                    with forced_backend(side_provider):
                        start = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - start)
            ours_s, theirs_s = sides[0][2], sides[1][2]
            out[name] = {
                "rounds": rounds,
                "fastattn_min_s": min(ours_s),
                "fastattn_median_s": statistics.median(ours_s),
                "torch_min_s": min(theirs_s),
                "torch_median_s": statistics.median(theirs_s),
            }
        return out


def _grid_name(config: pytest.Config) -> str:
    name = config.getoption("--shapes") or os.environ.get("FASTATTN_BENCH_GRID")
    if name:
        if name not in shapes.GRIDS:
            raise pytest.UsageError(f"FASTATTN_BENCH_GRID={name!r}: valid grids are {shapes.GRIDS}")
        return name
    return "smoke" if config.getoption("benchmark_disable", False) else "quick"


def _device(config: pytest.Config) -> torch.device:
    name = config.getoption("--bench-device") or os.environ.get("FASTATTN_BENCH_DEVICE") or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device=cuda but torch sees no CUDA device")
    return torch.device(name)


def _command(config: pytest.Config) -> str:
    """The pytest command line of this run, with the FASTATTN_* settings it ran under."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FASTATTN_")]
    args = [shlex.quote(a) for a in config.invocation_params.args]
    return " ".join(settings + ["python -m pytest"] + args)


def session_of(config: pytest.Config) -> BenchSession:
    """The run's BenchSession, made on first use from the options and environment."""
    session = getattr(config, "_fastattn_bench", None)
    if session is None:
        device = _device(config)
        disabled = bool(config.getoption("benchmark_disable", False))
        session = BenchSession(
            device=device,
            grid=shapes.grid(_grid_name(config), device),
            disabled=disabled,
            facts=dict(machine_facts(device), command=_command(config)),
            monitor=None if disabled else noise.CpuMonitor().start(),
        )
        config._fastattn_bench = session
    return session


def _rotation_sets(bytes_per_set: int, device: torch.device) -> int:
    """Input sets to cycle through so that, on a GPU, 2x the L2 lies between two uses of one set."""
    if device.type != "cuda" or bytes_per_set == 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    free, _ = torch.cuda.mem_get_info(device)
    wanted = math.ceil(2 * l2 / bytes_per_set)
    affordable = max(1, int(0.25 * free // bytes_per_set))
    return max(1, min(wanted, affordable, 32))


@contextlib.contextmanager
def unservable_as_skip(provider: Provider) -> Iterator[None]:
    """Turns "this backend cannot serve this call" into a skip that says why: the ops layer
    refusing a forced backend (a feature it lacks), or a torch baseline that this torch cannot
    run on this device (FlexAttention's backward on CPU, nested-tensor SDPA with is_causal): the
    skip keeps torch's own message. A fastattn op with no kernel for the device fails: every op
    has one in every build."""
    try:
        yield
    except NotImplementedError as error:
        if provider.kind == "torch":
            pytest.skip(f"{provider.name}: torch {torch.__version__} cannot run it here: {error}")
        raise
    except RuntimeError as error:
        if "forced backend" in str(error):
            pytest.skip(f"{provider.name}: {error}")
        if provider.kind == "torch" and "No viable backend" in str(error):
            pytest.skip(f"{provider.name}: torch {torch.__version__} cannot run it here: {error}")
        raise


def _pair(
    session: BenchSession,
    key: tuple,
    provider: Provider,
    call: Callable[[], None],
    t_call: float,
    info: dict[str, Any],
) -> None:
    """A fastattn call is held for the torch baselines of its key; a torch baseline is timed
    interleaved with the held ones (extra_info["interleaved"], which the report's ratios use).
    The reference backend (plain PyTorch, the tests' oracle) is not held: no one runs it for
    speed, and pairing it would add its slow calls to every baseline's time."""
    if provider.kind == "fastattn":
        if provider.backend != "reference":
            session.hold(key, provider, call, t_call)
    else:
        info["interleaved"] = session.interleave(key, provider, call, t_call)


def run_case(
    benchmark: Any,
    session: BenchSession,
    *,
    op: str,
    pass_: str,
    provider: Provider,
    shape: Any,
    dtype: torch.dtype,
    flops: float,
    bytes_moved: float,
    make_inputs: Callable[[], Any],
    make_call: Callable[[Any], Callable[[], object]],
) -> None:
    """Times ``make_call(inputs)()`` with pytest-benchmark and fills ``benchmark.extra_info``.

    make_inputs() -> one fresh random input set (tensors, modules); make_call(inputs) -> a
    zero-argument callable that runs the op once on that set.
    """
    device = session.device
    torch.manual_seed(0)
    first = make_inputs()
    sets = [first] + [
        make_inputs() for _ in range(_rotation_sets(_tensor_bytes(first), device) - 1)
    ]
    calls = [make_call(inputs) for inputs in sets]
    cycle = itertools.cycle(calls)

    def timed_call() -> None:
        next(cycle)()
        sync(device)

    info = benchmark.extra_info
    info.update(
        op=op,
        pass_=pass_,
        provider=provider.name,
        provider_kind=provider.kind,
        backend=provider.backend,
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        shape=shapes.shape_dict(shape),
        shape_id=shape.id,
        grid=session.grid.name,
        flops=flops,
        bytes=bytes_moved,
        rotation_sets=len(calls),
        machine=session.facts["machine"],
        cpu_model=session.facts["cpu_model"],
        cores=session.facts["cores"],
        gpu=session.facts["gpu"],
        torch=session.facts["torch"],
        triton=session.facts["triton"],
        git_commit=session.facts["git_commit"],
    )
    key = (op, pass_, info["dtype"], shape.id)
    with forced_backend(provider):
        if session.disabled:  # smoke: each case runs exactly once, untimed
            with unservable_as_skip(provider):
                benchmark.pedantic(timed_call, rounds=1, iterations=1)
            _pair(session, key, provider, timed_call, 0.0, info)
            return
        grid = session.grid
        start = time.perf_counter()
        with unservable_as_skip(provider):
            timed_call()  # compilation, autotuning, allocator growth
        sync(device)
        warmup = [time.perf_counter() - start]
        while len(warmup) < 10 and (len(warmup) < 2 or sum(warmup) < grid.time_budget_s / 3):
            start = time.perf_counter()
            timed_call()
            warmup.append(time.perf_counter() - start)
        per_call = statistics.median(warmup[1:])
        peak, method = peak_memory(timed_call, device)
        rounds = grid.rounds(per_call)
        benchmark.pedantic(timed_call, rounds=rounds, iterations=1, warmup_rounds=0)
    _pair(session, key, provider, timed_call, per_call, info)

    median = benchmark.stats.stats.median
    roofline = session.roofline
    rate = gemm_rate(roofline, dtype)
    gflops = flops / median / 1e9
    gbps = bytes_moved / median / 1e9
    info.update(
        warmup_calls=len(warmup),
        rounds=rounds,
        median_s=median,
        gflops=gflops,
        gbps=gbps,
        peak_memory_bytes=peak,
        peak_memory_method=method,
        roofline=roofline,
        gemm_efficiency=gflops / rate if rate else None,
        bandwidth_efficiency=gbps / roofline["copy_gbps"],
    )
