"""One stage from start to finish: validate the recipe, open its MLflow run, resolve registered inputs, run the
loop (:mod:`mole.train.loop`) on the stage's spec (:mod:`mole.train.stages`), record lineage and register the
result. What ``mole train``, the pipeline's steps and the benchmarks call (as ``mole.train.train_stage``)."""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mole import tracking
from mole.train.config import (
    ConfigError,
    MoleConfig,
    StageName,
    format_validation_error,
    stage_config,
)
from mole.train.stages import write_result

logger = logging.getLogger(__name__)

__all__ = ["train_stage"]


def train_stage(
    stage: StageName,
    config: MoleConfig,
    *,
    output: str | os.PathLike[str] | None = None,
    data: str | dict[str, str] | None = None,
    base: str | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    expert_name: str | None = None,
    experts: dict[str, str] | None = None,
    gate: str | None = None,
    condition: str | None = None,
    resume_changed: bool = False,
):  # -> mole.train.loop.TrainResult
    """Train one stage. Arguments override the config's values; everything is validated before training.

    Args:
        stage: ``stage1``, ``expert`` or ``gates``.
        config: The recipe (see :func:`mole.train.config.load_config`).
        output: Folder for the result, checkpoints, metrics and validation images.
        data: Dataset folder or ``s3://`` URI, or several by name (a mixture, see ``data_weights``).
        base: Model to start from (stage 1 fine-tunes it; experts and gates build on it).
        max_steps: Optimizer steps.
        resume: ``latest`` or a checkpoint path.
        expert_name: The expert to train (``experts.<name>`` section) for ``stage == "expert"``.
        experts: ``{name: path}`` for ``stage == "gates"``.
        gate: ``local``, ``global`` or ``both`` for ``stage == "gates"``.
        condition: ``none`` or ``timestep`` (timestep-aware gates) for ``stage == "gates"``.
        resume_changed: Resume even if the data or the settings differ from those of the checkpoint's run
            (refused otherwise); the new ones then apply and are what is recorded.

    Raises:
        ConfigError: Invalid settings. mole.train.stages.StageError: missing model, bad experts.
        mole.data.shards.DatasetError: Missing, empty or unreadable dataset.
    """
    from mole import tracking
    from mole.data.shards import read_index
    from mole.storage import localize
    from mole.train.loop import run_training
    from mole.train.metrics import JsonlLogger, TeeLogger
    from mole.train.stages import build_stage

    cfg = stage_config(config, stage, expert_name)
    updates: dict[str, Any] = {}
    if data is not None:
        updates["data"] = data
    if output is not None:
        updates["output"] = str(output)
    if max_steps is not None:
        updates["max_steps"] = max_steps
    if stage == "gates":
        if experts:
            updates["experts"] = experts
        if gate is not None:
            updates["gate"] = gate
        if condition is not None:
            updates["condition"] = condition
    try:
        cfg = cfg.model_validate({**cfg.model_dump(), **updates})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{stage} settings")) from None
    if cfg.data is None:
        raise ConfigError(f"{stage}: no dataset (give --data or set data in the config)")
    if cfg.output is None:
        raise ConfigError(f"{stage}: no output folder (give --output or set output in the config)")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is an existing file, not a folder")
    sources = cfg.data if isinstance(cfg.data, dict) else {"data": cfg.data}
    if not sources:
        raise ConfigError(f"{stage}: data is an empty mapping; name at least one dataset")
    cache = out / ".data-cache"
    local = {n: localize(u, cache / n if len(sources) > 1 else cache) for n, u in sources.items()}
    indexes = {n: read_index(p) for n, p in local.items()}  # a missing or empty dataset fails here, before any model
    local_data: str | dict[str, str] = (
        {n: str(p) for n, p in local.items()} if isinstance(cfg.data, dict) else str(local["data"])
    )
    base_model = base or config.model.base
    stage_experts = getattr(cfg, "experts", None)
    main = int(os.environ.get("RANK", "0")) == 0
    run = None
    if main and tracking.enabled():
        run = tracking.StageRun(stage if expert_name is None else f"expert:{expert_name}")
    with run if run is not None else nullcontext():  # the run ends FAILED if anything below raises
        upstream = {"base": str(base_model), **{f"expert_{n}": str(u) for n, u in (stage_experts or {}).items()}}
        if run is not None:  # models from the registry are fetched; local folders pass through
            base_model = str(tracking.resolve_model(str(base_model), out / ".models" / "base"))
            if stage_experts:
                models = out / ".models"
                stage_experts = {n: str(tracking.resolve_model(u, models / n)) for n, u in stage_experts.items()}
        elif any(str(u).startswith("models:/") for u in [base_model, *(stage_experts or {}).values()]):
            raise ConfigError("models:/ URIs need MLflow tracking (unset MOLE_TRACKING=off)")
        import torch

        torch.manual_seed(cfg.seed)  # the LoRA init draws random numbers: the seed must cover it too
        spec = build_stage(stage, cfg, config.model, base_model, expert_name=expert_name, experts=stage_experts)
        params = {"stage": stage, "base": upstream["base"], "model": config.model.model_dump(),
                  stage: cfg.model_dump(), "data_digests": {n: i.digest for n, i in indexes.items()}}  # fmt: skip
        if base_model != upstream["base"]:  # fetched from the registry: where its copy is
            params["base_local"] = base_model
        metrics = None
        if run is not None:
            _record_lineage(run, indexes, sources, upstream)
            metrics = TeeLogger(JsonlLogger(out), run)
        result = run_training(
            spec, cfg, local_data, out, resolution=config.model.resolution, resume=resume, params=params,
            metrics=metrics, resume_changed=resume_changed,
        )  # fmt: skip
        if run is not None and result.result is not None:
            _register(run, stage, expert_name, out, result.result, base_model, stage_experts, upstream["base"])
    return result


def _record_lineage(run, indexes: dict, sources: dict[str, str], upstream: dict[str, str]) -> None:
    """Every dataset (and the run that curated it) and the upstream models, given as the user gave them: a
    registry URI names its source run; a local folder its stage's result.json. One unnamed dataset keeps the
    single-source names (context ``training``, upstream ``curate``); named ones get ``training.<name>`` and
    ``curate.<name>``, so a mixture records each source's digest."""
    for name, index in indexes.items():
        single = name == "data" and len(indexes) == 1
        run.log_dataset(sources[name], index.name, index.digest, context="training" if single else f"training.{name}")
        curate_run = (index.meta or {}).get("mlflow_run_id")
        if curate_run:
            run.log_upstream("curate" if single else f"curate.{name}", curate_run)
    for name, uri in upstream.items():
        info = tracking.source_of(uri)
        run.log_upstream(name, info.get("mlflow_run_id"), info.get("model_id"))


def _register(run, stage: str, expert: str | None, out: Path, result: Path, base: str, experts, base_uri: str) -> None:
    """Register the stage's result in the model registry and note the run and model in result.json."""
    if stage == "stage1":
        ref = run.register_stage1(result)
    elif stage == "expert":
        base_uri = tracking.source_of(base_uri).get("model_uri") or base_uri  # a registry URI passes through
        ref = run.register_expert(expert, result, base_uri)
    else:
        ref = run.register_mole(Path(base), {n: Path(p) for n, p in experts.items()}, result)
    info = json.loads((out / "result.json").read_text(encoding="utf-8"))
    info.update(mlflow_run_id=run.run_id, model_uri=ref.uri, model_id=ref.model_id, registered=ref.name,
                version=ref.version)  # fmt: skip
    write_result(out, info)
