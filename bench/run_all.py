"""Every benchmark, one after the other, then the Markdown summary: what ``make bench`` runs.

Each benchmark runs in its own process (``python -m bench.<name>``), so one's memory (SD1.5's UNet for its FLOP
count) and thread settings (curation is per core, the rest use 2 threads) do not leak into the next, and each
replaces its own section of ``bench/results/latest.json``. Then ``bench/results/latest.md`` is rendered from it
(:mod:`bench.report`). A failing benchmark does not stop the others; the exit status says one failed.

``--quick`` uses fewer repeats and steps and leaves out the demo (6–10 minutes), whose earlier figure then
stays in the results with its own date. The ``run`` section records, per benchmark, its last run: the command,
how long it took, when it finished and the load average before and after.

    python -m bench.run_all [--quick] [--only mole_cost training ...] [--skip demo] [--report-only]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import load_average_1m, load_results, update_results
from bench.report import write_report

logger = logging.getLogger("bench.run_all")
REPO = Path(__file__).resolve().parent.parent

#: Section of latest.json → the module that writes it, its arguments, and its arguments with ``--quick``.
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "mole_cost": (
        "bench.mole_cost",
        ["--sizes", "tiny", "mid", "sd15"],
        ["--sizes", "tiny", "mid", "sd15", "--quick"],
    ),
    "layer": ("bench.layer_fused_vs_naive", [], ["--repeats", "10"]),
    "layer_ops": ("bench.layer_ops", [], []),
    "layer_before_after": ("bench.layer_before_after", [], ["--repeats", "8"]),
    # The tiny rows (any machine); the SD1.5 rows come from `make gpu-check` on a GPU.
    "generate_speed": (
        "bench.generate_speed",
        ["--size", "tiny", "--batches", "1", "8", "--steps", "25"],
        ["--size", "tiny", "--batches", "1", "--steps", "5", "--repeats", "1"],
    ),
    "training": ("bench.train_throughput", [], ["--quick"]),
    "curation": ("bench.curate_throughput", [], ["--quick"]),
    "demo": ("bench.demo_wall", [], []),
}
#: Left out by ``--quick`` (unless named in ``--only``).
SLOW = ("demo",)


def run_one(name: str, quick: bool) -> dict[str, Any]:
    """Run one benchmark in a child process; how it went (its figures are in latest.json)."""
    module, args, quick_args = BENCHMARKS[name]
    cmd = [sys.executable, "-m", module, *(quick_args if quick else args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    logger.info("== %s: %s", name, " ".join(cmd[1:]))
    before, t0 = load_average_1m(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    seconds = time.perf_counter() - t0
    logger.info("== %s: exit %d after %.0f s", name, proc.returncode, seconds)
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "load_average_1m_before": before,
        "load_average_1m_after": load_average_1m(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps; leaves out the demo")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", default=[], choices=sorted(BENCHMARKS), help="leave these out")
    parser.add_argument("--report-only", action="store_true", help="only rewrite latest.md from latest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report_only:
        logger.info("wrote %s", write_report())
        return 0
    names = args.only or [n for n in BENCHMARKS if not (args.quick and n in SLOW)]
    names = [n for n in names if n not in args.skip]
    left_out = {
        n: "--skip" if n in args.skip else "not in --only" if args.only else "--quick"
        for n in BENCHMARKS
        if n not in names
    }
    runs = {name: run_one(name, args.quick) for name in names}
    # Benchmarks left out this time keep the record of their last run, as their sections keep its figures.
    earlier = load_results().get("run", {}).get("benchmarks", {})
    record = {n: runs.get(n) or earlier[n] for n in BENCHMARKS if n in runs or n in earlier}
    update_results("run", {"quick": args.quick, "benchmarks": record, "left_out": left_out})
    failed = [n for n, r in runs.items() if r["returncode"] != 0]
    logger.info("wrote %s", write_report())
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
