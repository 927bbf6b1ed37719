"""End to end: the wall time of ``make demo`` (whatever pipeline it runs) into a temporary OUT folder.

The setup step is not timed and not re-run (``make -o .venv/.installed``). Tracking stays on, as for a user,
but goes to a temporary sqlite store whose experiment keeps its artifacts in the temporary folder, so the
benchmark leaves nothing in mlruns/. The recipe that ran is recorded with the time: the target's commands
as ``make -n demo`` prints them.

    python -m bench.demo_wall
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import update_results

REPO = Path(__file__).resolve().parent.parent
STAMP = ".venv/.installed"


def _recipe(out: Path) -> list[str]:
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", STAMP, "demo", f"OUT={out}"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line.replace(str(out), "$(OUT)") for line in proc.stdout.splitlines() if line.strip()]


def measure(timeout: float = 1800) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mole-bench-demo-") as tmp:
        tmp_path = Path(tmp)
        out = tmp_path / "demo"
        db = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": db, "HF_HUB_OFFLINE": "1"}
        env.pop("MOLE_TRACKING", None)
        import mlflow

        mlflow.set_tracking_uri(db)
        mlflow.MlflowClient().create_experiment("mole", artifact_location=(tmp_path / "artifacts").as_uri())
        recipe = _recipe(out)
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["make", "--no-print-directory", "-o", STAMP, "demo", f"OUT={out}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"command": "make demo", "recipe": recipe, "wall_seconds": seconds}
    if proc.returncode != 0:
        result["error"] = f"make demo exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    report = measure()
    update_results("demo", report)
    print(json.dumps(report, indent=2))
    if "error" in report:  # recorded, and the run says it failed
        sys.exit(1)


if __name__ == "__main__":
    main()
