"""The one small interface training reports through; the tracking module backs it with MLflow.

Until then (and always, as a local record) metrics go to ``metrics.jsonl`` in the stage's output folder:
one JSON object per line, ``{"step": int, "time": float, <name>: <value>, ...}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol


class MetricsLogger(Protocol):
    """What the loop calls; implementations must be cheap and must never raise into training."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, kind: str) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Append-only JSONL file of metrics, plus ``params.json``; artifacts are only listed."""

    def __init__(self, output: Path) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.output = output
        self._file = (output / "metrics.jsonl").open("a", encoding="utf-8")

    def log_params(self, params: dict[str, Any]) -> None:
        (self.output / "params.json").write_text(json.dumps(params, indent=2, default=str) + "\n", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._file.flush()

    def log_artifact(self, path: Path, kind: str) -> None:
        self._file.write(json.dumps({"artifact": str(path), "kind": kind, "time": time.time()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLogger:
    """For processes other than the main one."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, kind: str) -> None:
        pass

    def close(self) -> None:
        pass


class TeeLogger:
    """Send everything to several loggers (the local JSONL record and MLflow)."""

    def __init__(self, *loggers: MetricsLogger) -> None:
        self.loggers = [lg for lg in loggers if lg is not None]

    def log_params(self, params: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path: Path, kind: str) -> None:
        for lg in self.loggers:
            lg.log_artifact(path, kind)

    def close(self) -> None:
        for lg in self.loggers:
            if not hasattr(lg, "run_id"):  # an MLflow run is closed by its owner, after registration
                lg.close()
