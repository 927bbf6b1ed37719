"""What every benchmark shares: interleaved timing, machine/version facts, and the results file.

Timings on a shared machine are noisy, so every comparison is made within one run: the variants are called
in turn (A B C A B C ...), each figure is a median over the repeats, and what is reported is a ratio of
those medians. Nothing here asserts on a time: a benchmark measures, the tests check behaviour.

``bench/results/latest.json`` holds one section per benchmark (``mole_cost``, ``training``, ``curation``,
``demo``); a benchmark run replaces its own section and keeps the others, so they can be re-run one by one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
LATEST_JSON = RESULTS_DIR / "latest.json"
LATEST_MD = RESULTS_DIR / "latest.md"
SCHEMA = "mole-bench/1"

_PACKAGES = ("torch", "diffusers", "peft", "transformers", "accelerate", "deepspeed", "opencv-python-headless")


def versions() -> dict[str, str]:
    """Versions of python, mole and the packages whose speed is measured (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in ("mole", *_PACKAGES):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average_1m() -> float | None:
    """The 1-minute load average (how busy the shared machine was), None where the OS has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    """The machine a run measured: CPU, cores, torch threads, load, and the GPU if there is one."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": load_average_1m(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        # How idle OpenMP threads wait (bench/__init__.py sets PASSIVE unless it is already set).
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins, then sleeps)"),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    return info


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Call every function in turn ``repeats`` times (A B C A B C ...) and return the seconds of each call.

    Args:
        fns: Name → a call with no arguments.
        repeats: Rounds after the warm-up.
        warmup: Untimed rounds first (allocator, caches, lazy initialisation).
        sync: Called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios num[k]/den[k]: robust to load that drifts over the run."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def overhead_ratio(naive: float, base: float, mole: float) -> float | None:
    """``speedup_vs_naive``: how much less MoLE adds to the base time than the naive layers do,
    (naive − base) / (MoLE − base). None when MoLE adds nothing measurable (the ratio is unbounded)."""
    added = mole - base
    if added <= 0:
        return None
    return (naive - base) / added


def paired_overhead_ratio(naive: list[float], base: list[float], mole: list[float]) -> float | None:
    """``speedup_vs_naive`` from per-round differences: median(naive_k − base_k) / median(mole_k − base_k).

    Each round's variants run back to back, so a difference within a round cancels load that drifts between
    rounds; a ratio of two small differences of medians does not, and swings with the load.
    """
    added = statistics.median(m - b for m, b in zip(mole, base, strict=True))
    if added <= 0:
        return None
    return statistics.median(n - b for n, b in zip(naive, base, strict=True)) / added


def load_results(path: Path = LATEST_JSON) -> dict[str, Any]:
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") == SCHEMA:
            return data
    return {"schema": SCHEMA}


def update_results(section: str, payload: dict[str, Any], path: Path = LATEST_JSON) -> dict[str, Any]:
    """Replace one section of the results file (keeping the others) and stamp it with machine and versions.

    The section gets ``measured_at``, ``machine`` and ``versions`` of this run, since sections can come from
    different runs. Written atomically.
    """
    data = load_results(path)
    data[section] = {
        **payload,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
    }
    data["machine"], data["versions"] = data[section]["machine"], data[section]["versions"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


def window_throughput(metrics_file: Path) -> dict[str, Any]:
    """Samples/s over a run's logging windows (``metrics.jsonl``): the median, the first window left out."""
    windows = [
        row["samples_per_second"]
        for row in map(json.loads, metrics_file.read_text(encoding="utf-8").splitlines())
        if "samples_per_second" in row
    ]
    if not windows:
        raise ValueError(f"{metrics_file} has no samples_per_second rows")
    steady = windows[1:] or windows
    return {"samples_per_second": statistics.median(steady), "windows": len(steady)}
