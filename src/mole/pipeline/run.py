"""Compile the pipeline, run it locally on the embedded default, submit it to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mole.pairs import split_pair
from mole.security import check_name

logger = logging.getLogger(__name__)

#: The embedded default: tiny model, synthetic data, CLIP score with a tiny CLIP, everything on CPU in minutes.
EMBEDDED_PARAMS: dict[str, Any] = {
    "config": "configs/demo.yaml", "base_model": "tiny", "data_source": "synthetic", "synthetic_count": 32,
    "scorers": "clip", "num_prompts": 8, "repeats": 3, "eval_steps": 4, "promote_metric": "clip", "gpus": 1,
}  # fmt: skip


def pipeline_module():
    """The pipeline definition, :mod:`mole.pipeline.dsl` (imported here, not at the top: it needs kfp, which
    only the ``pipeline`` extra installs)."""
    from mole.pipeline import dsl

    return dsl


def parse_experts(specs: Sequence[str] | None) -> dict[str, str] | None:
    """``["face=faces", "feet"]`` -> ``{"face": "faces", "feet": "feet"}`` (the data kind defaults to the
    name's plural as the synthetic and curated kinds spell it)."""
    if not specs:
        return None
    out: dict[str, str] = {}
    for spec in specs:
        if "=" in spec:
            name, kind = split_pair(spec, "expert spec", "NAME or NAME=DATA_KIND", need_value=False)
        else:
            name, kind = spec.strip(), ""
        if not name:
            raise ValueError(f"expert spec {spec!r} needs a name (NAME or NAME=DATA_KIND)")
        check_name(name, "--expert")
        out[name] = check_name(kind, "--expert data kind") if kind else {"face": "faces", "hand": "hands",
                                                                       "foot": "feet"}.get(name, name)  # fmt: skip
    return out


def compile_pipeline(output: str | os.PathLike[str], experts: Mapping[str, str] | None = None) -> Path:
    """Compile to YAML. The image is ``mole.pipeline.components.constants.IMAGE`` (``MOLE_IMAGE`` overrides it)."""
    from kfp import compiler

    module = pipeline_module()
    func = module.build_pipeline(experts) if experts else module.mole_pipeline
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(func, str(output))
    output.write_text(stable_header(output.read_text(encoding="utf-8")), encoding="utf-8")
    return output


def stable_header(text: str) -> str:
    """kfp's header comment prints dict defaults in protobuf map order, which changes with Python's hash seed;
    print them with sorted keys so that the committed YAML is reproducible. Only ``#`` lines change."""
    import ast

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [ordered(v) for v in value]
        return value

    lines = []
    for line in text.splitlines(keepends=True):
        head, sep, rest = line.partition("[Default: ")
        if line.startswith("#") and sep and rest.rstrip().endswith("]"):
            try:
                value = ast.literal_eval(rest.rstrip()[:-1])
            except (ValueError, SyntaxError):
                lines.append(line)
                continue
            line = f"{head}{sep}{ordered(value)!r}]\n"
        lines.append(line)
    return "".join(lines)


def pipeline_parameters(package: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The compiled pipeline's parameters: name -> ``{"parameterType": ..., "defaultValue": ...}``."""
    import yaml

    spec = next(yaml.safe_load_all(Path(package).read_text(encoding="utf-8")))  # then the platform spec
    return dict(spec["root"]["inputDefinitions"]["parameters"])


def parse_params(pairs: Sequence[str], declared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``key=value`` pairs typed by the pipeline's declared parameters (JSON for dicts and lists).

    Raises:
        ValueError: Unknown parameter, or a value that is not of its type (the message names both).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, raw = split_pair(pair, "pipeline parameter", "KEY=VALUE", need_value=False, strip_value=False)
        if key not in declared:
            raise ValueError(f"unknown pipeline parameter {key!r}; the pipeline takes: {', '.join(sorted(declared))}")
        kind = declared[key].get("parameterType", "STRING")
        try:
            if kind == "NUMBER_INTEGER":
                value: Any = int(raw)
            elif kind == "NUMBER_DOUBLE":
                value = float(raw)
            elif kind == "BOOLEAN":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = raw.lower() in ("true", "1")
            elif kind in ("STRUCT", "LIST"):
                value = json.loads(raw)
                if not isinstance(value, dict if kind == "STRUCT" else list):
                    raise ValueError(f"expected a JSON {'object' if kind == 'STRUCT' else 'array'}")
            else:
                value = raw
        except ValueError as err:
            raise ValueError(f"pipeline parameter {key}={raw!r}: {err} ({kind})") from None
        out[key] = value
    return out


def run_local(
    workspace: str | os.PathLike[str], params: Mapping[str, Any] | None = None,
    experts: Mapping[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the whole DAG here with kfp's local SubprocessRunner (every step a subprocess of this Python, the
    parallel branches one after the other), on the embedded default unless ``params`` say otherwise. Steps are
    not retried here: a local failure is not a transient one, so it is reported at once.

    Returns:
        ``{"seconds", "workspace", "params", "promotion"}``: ``promotion`` is what the promote step said (the new
        champion, or why ``champion`` was left alone), "" when the run did not get there.
    """
    from kfp import local

    func = pipeline_module().build_pipeline(experts, retries=0)
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    args = {**EMBEDDED_PARAMS, "workspace": str(workspace), **dict(params or {})}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workspace / "kfp"))
    started = time.monotonic()
    func(**args)
    seconds = time.monotonic() - started
    report = demo_report(workspace) if args.get("base_model") == "tiny" else None
    return {"seconds": seconds, "workspace": str(workspace), "params": args, "promotion": _promotion(workspace),
            "report": str(report or "")}  # fmt: skip


def demo_report(workspace: Path) -> Path | None:
    """The page a person looks at after a local run (:func:`mole.evaluate.report.build_report`) for the newest run
    under ``workspace``, also stored as artifacts of the pipeline's parent MLflow run. None when no run is there."""
    from mole import tracking
    from mole.evaluate.report import build_report

    runs = sorted((workspace / "runs").glob("*/stage1"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return None
    workdir = runs[-1].parent
    page = build_report(workdir)
    if tracking.enabled():
        run_id = tracking.log_pipeline_artifacts(workdir.name, page.parent, "report")
        logger.info("run report logged to MLflow run %s (artifacts/report/index.html)", run_id)
    return page


def _promotion(workspace: Path) -> str:
    """The promote step's output of the newest local run under ``workspace`` ("" when there is none)."""
    outputs = sorted((workspace / "kfp").glob("*/promote-op/executor_output.json"), key=lambda f: f.stat().st_mtime)
    if not outputs:
        return ""
    try:
        return str(json.loads(outputs[-1].read_text(encoding="utf-8"))["parameterValues"]["Output"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def submit(
    host: str, package: str | os.PathLike[str], params: Mapping[str, Any], *, experiment: str = "mole",
    run_name: str | None = None, namespace: str | None = None,
) -> str:  # fmt: skip
    """Submit the compiled pipeline to a KFP API endpoint; returns the run id. A bearer token, when the endpoint
    needs one, comes only from ``KFP_TOKEN`` (or the in-cluster service-account token kfp finds itself)."""
    import kfp

    client = kfp.Client(
        host=host, existing_token=os.environ.get("KFP_TOKEN") or None, namespace=namespace or "kubeflow"
    )
    run = client.create_run_from_pipeline_package(
        str(package), arguments=dict(params), experiment_name=experiment, run_name=run_name, namespace=namespace,
    )  # fmt: skip
    return run.run_id
