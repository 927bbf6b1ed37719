"""MLflow: one run per stage under an optional parent, lineage, the model registry, promotion. The only module
that imports mlflow.

Lineage is recorded three ways, each readable through the MLflow client: datasets as run inputs (with the
mole-shards digest), upstream models as logged-model inputs, and upstream run ids as ``mole.upstream.*``
tags. Every stage writes its run id and model URI into its ``result.json`` as well, so a stage started from
a local folder still finds its upstream run.

Tracking is on by default: ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlruns/mlflow.db``, artifacts under
``mlruns/``), ``MLFLOW_EXPERIMENT_NAME`` (default ``mole``), ``MLFLOW_RUN_ID`` (resume/adopt a run) and
``MOLE_PARENT_RUN_ID`` (the pipeline's parent run) are honoured; ``MOLE_TRACKING=off`` disables it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mole.security import check_name, holds_env_secret, is_secret_key, redact
from mole.serve.pyfunc import mole_pyfunc, pyfunc_environment
from mole.storage import StorageError
from mole.uris import ModelURI, model_version, parse_model_uri

logger = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "mole"
REGISTERED = {"stage1": "mole-stage1", "mole": "mole"}


def expert_model_name(expert: str) -> str:
    """The registered model of expert ``expert``; the name is checked first (it names a registry entry)."""
    return f"mole-expert-{check_name(expert)}"


def enabled() -> bool:
    return os.environ.get("MOLE_TRACKING", "on").lower() not in ("0", "off", "false", "no")


class TrackingConfigError(RuntimeError):
    """Tracking is on but this process has nowhere durable to track to; the message names what to set."""


def _mlflow():
    import mlflow

    # The environment is the configuration, every call: a URI set earlier in this process (the local default, or
    # another server's) must not outlive it, since mlflow's own global would take precedence over the variable.
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)
    else:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            # In a pod, the local default is a sqlite file that vanishes with the pod: runs and registered
            # versions would be lost without a word. Refuse instead.
            raise TrackingConfigError(
                "MLFLOW_TRACKING_URI is not set in this pod, and tracking into a pod-local sqlite file would lose "
                "every run with the pod. Pipeline steps read it from the ConfigMap named by the pipeline's "
                "config_map parameter (the chart's pipeline.configMap.name, default mole-config) and their MLflow "
                "user from the Secret named by mlflow_secret (default mole-mlflow); or set MOLE_TRACKING=off."
            )
        Path("mlruns").mkdir(exist_ok=True)
        mlflow.set_tracking_uri(DEFAULT_URI)
    return mlflow


def _client():
    return _mlflow().MlflowClient()


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten nested params to dotted keys; blank any whose key looks like a credential and any value that holds
    a credential found in the environment; mask credentials inside URIs (:func:`mole.security.redact`), so
    ``--output s3://user:pass@bucket/x`` is stored as ``s3://***@bucket/x``. Secrets never reach MLflow."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
        # A value holding an environment secret is blanked whole; URI credentials are masked in place.
        text = "***" if is_secret_key(prefix) or holds_env_secret(text) else redact(text)
        flat[prefix] = text[:6000]

    walk("", dict(params))
    return flat


class ArtifactStoreError(StorageError):
    """Artifacts could not be stored through the tracking server (its artifact store is down or refuses them).

    Raised before anything is registered: a model version never points at artifacts that were not stored.
    """


class StageRun:
    """One MLflow run for one stage; also a :class:`mole.train.metrics.MetricsLogger`.

    Args:
        stage: ``curate``, ``stage1``, ``expert:face``, ``gates``, ``evaluate``...
        tags: Extra tags (the run also gets ``mole.stage``).
    """

    def __init__(self, stage: str, tags: Mapping[str, str] | None = None) -> None:
        mlflow = _mlflow()
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        parent = os.environ.get("MOLE_PARENT_RUN_ID")
        all_tags = {"mole.stage": stage, **(tags or {})}
        self.run = mlflow.start_run(run_name=stage.replace(":", "-"), parent_run_id=parent, tags=all_tags,
                                    log_system_metrics=_system_metrics())  # fmt: skip
        self.run_id = self.run.info.run_id
        self.stage = stage
        self._mlflow = mlflow
        logger.info("MLflow run %s (%s) at %s", self.run_id, stage, redact(mlflow.get_tracking_uri()))

    # --- the MetricsLogger interface -------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        flat = redact_params(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, kind: str) -> None:
        with self._storing(f"the {kind} artifact {path.name}"):
            self._mlflow.log_artifact(str(path), artifact_path=kind)

    @contextlib.contextmanager
    def _storing(self, what: str) -> Iterator[None]:
        """Turn a failed artifact upload (MLflow's own exception, after its retries) into an error that says what
        was being stored, where, and that nothing was registered."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as err:
            cause = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise ArtifactStoreError(
                f"could not store {what} of run {self.run_id} ({self.stage}) through the tracking server at "
                f"{redact(self._mlflow.get_tracking_uri())}: its artifact store (S3) may be down or refusing "
                f"uploads; nothing was registered. Cause: {cause}"
            ) from err

    def close(self, status: str = "FINISHED") -> None:
        if self._mlflow.active_run() is not None and self._mlflow.active_run().info.run_id == self.run_id:
            self._mlflow.end_run(status=status)

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    # --- lineage ---------------------------------------------------------------------------------------
    def log_dataset(self, path: str, name: str, digest: str, context: str = "training") -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        source = resolve_dataset_source(str(Path(path).resolve()) if "://" not in str(path) else str(path))
        dataset = MetaDataset(source, name=name, digest=digest[:36])
        self._mlflow.log_input(dataset, context=context, tags={"mole.digest": digest})
        self._mlflow.set_tag(f"mole.dataset.{context}", digest)

    def log_upstream(self, name: str, run_id: str | None, model_id: str | None = None) -> None:
        """Record an upstream stage: its run id as a tag and its logged model as an input."""
        if run_id:
            self._mlflow.set_tag(f"mole.upstream.{name}", run_id)
        if model_id:
            from mlflow.entities import LoggedModelInput

            self._mlflow.log_input(model=LoggedModelInput(model_id))

    def set_tag(self, key: str, value: str) -> None:
        self._mlflow.set_tag(key, value)

    # --- registry --------------------------------------------------------------------------------------
    def register_stage1(self, model_dir: Path) -> ModelRef:
        with self._storing("the stage-1 model"):
            info = self._mlflow.pyfunc.log_model(
                name="model", python_model=mole_pyfunc(), artifacts={"base": str(model_dir)},
                model_config={"experts": {}, "gates": False}, registered_model_name=REGISTERED["stage1"],
                **pyfunc_environment(),
            )  # fmt: skip
        return self._ref(info, REGISTERED["stage1"])

    def register_expert(self, expert: str, lora_file: Path, base_uri: str) -> ModelRef:
        import shutil
        import tempfile

        name = expert_model_name(expert)
        with tempfile.TemporaryDirectory() as staging, self._storing(f"the {expert} expert"):
            # Only the adapter: the stage's folder also holds checkpoints and the downloaded base model.
            for f in (lora_file, lora_file.parent / "adapter_config.json"):
                if f.is_file():
                    shutil.copy2(f, Path(staging) / f.name)
            info = self._mlflow.diffusers.log_model(
                staging, base_model=base_uri, adapter_type="lora", name="expert", registered_model_name=name,
                pip_requirements=_requirements(),
            )  # fmt: skip
        return self._ref(info, name)

    def register_mole(self, base_dir: Path, experts: Mapping[str, Path], gates: Path, alias: str = "candidate"):
        """The full mixture as one self-contained pyfunc version of ``mole``, aliased ``candidate``."""
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as staging, self._storing("the MoLE model"):
            # MLflow stores artifacts under their base names, and every expert file is called
            # pytorch_lora_weights.safetensors: give each expert (and the gates) a folder of its own.
            artifacts = {"base": str(base_dir)}
            gates_dir = Path(staging) / "gates"
            gates_dir.mkdir()
            shutil.copy2(gates, gates_dir / "gates.safetensors")
            if gates.with_suffix(".json").is_file():
                shutil.copy2(gates.with_suffix(".json"), gates_dir / "gates.json")
            artifacts["gates"] = str(gates_dir)
            for name, path in experts.items():
                weights = path if path.is_file() else _lora_file(path)
                folder = Path(staging) / f"expert_{name}"
                folder.mkdir()
                shutil.copy2(weights, folder / weights.name)
                artifacts[f"expert_{name}"] = str(folder)
            info = self._mlflow.pyfunc.log_model(
                name="model", python_model=mole_pyfunc(), artifacts=artifacts,
                model_config={"experts": sorted(experts), "gates": True, "condition": _gate_condition(gates)},
                registered_model_name=REGISTERED["mole"], **pyfunc_environment(),
            )  # fmt: skip
        ref = self._ref(info, REGISTERED["mole"])
        _client().set_registered_model_alias(REGISTERED["mole"], alias, ref.version)
        return ref

    def _ref(self, info, registered: str) -> ModelRef:
        version = str(info.registered_model_version)
        self._mlflow.set_tag(f"mole.model.{registered}", version)
        return ModelRef(registered, version, info.model_id, f"models:/{registered}/{version}", self.run_id)


@dataclass
class ModelRef:
    name: str
    version: str
    model_id: str
    uri: str
    run_id: str


def _gate_condition(gates: Path) -> str:
    """``none`` or ``timestep``: what the registered mixture's gates see besides the features."""
    from mole.gates_io import read_gate_settings

    return read_gate_settings(gates).condition


def _lora_file(folder: Path) -> Path:
    for candidate in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise FileNotFoundError(f"no LoRA weights file in {folder}")


def _model_version_of(ref: ModelURI):  # -> mlflow.entities.model_registry.ModelVersion
    """The registry's record of a parsed ``models:/`` URI (by version or through its alias)."""
    client = _client()
    return (
        client.get_model_version(ref.name, ref.version)
        if ref.version
        else client.get_model_version_by_alias(ref.name, ref.alias)
    )


def resolve_version(uri: str) -> str:
    """``models:/NAME@ALIAS`` as the version it points to now (``models:/NAME/7``); other URIs unchanged. Loading
    the resolved version, not the alias, makes "which model is this" answerable (the service reports it) and
    immune to the alias moving while the artifacts download."""
    ref = parse_model_uri(uri)
    if ref is None or ref.alias is None:
        return uri
    return f"models:/{ref.name}/{_client().get_model_version_by_alias(ref.name, ref.alias).version}"


def load_registered_pipeline(uri: str):  # -> diffusers.StableDiffusionPipeline
    """The generation pipeline of a registered mole model (``models:/mole@champion``, ``models:/mole-stage1/2``)."""
    model = _mlflow().pyfunc.load_model(uri)
    return model.unwrap_python_model().pipe


def _system_metrics() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("MOLE_SYSTEM_METRICS", "on").lower() not in ("0", "off", "false")


def _requirements() -> list[str]:
    from mole.serve.pyfunc import requirements

    return requirements()


def result_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``result.json`` of the stage that produced ``path`` (the file, its folder or the folder above)."""
    p = Path(path)
    for folder in (p if p.is_dir() else p.parent, (p if p.is_dir() else p.parent).parent):
        candidate = folder / "result.json"
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return {}


def source_of(uri: str) -> dict[str, Any]:
    """The run and logged model that produced a model: for ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` the
    registry's record, for a local path its stage's ``result.json``."""
    ref = parse_model_uri(uri)
    if ref is None:
        return result_of(uri)
    mv = _model_version_of(ref)
    return {"mlflow_run_id": mv.run_id, "model_id": getattr(mv, "model_id", None), "registered": ref.name,
            "version": mv.version}  # fmt: skip


def resolve_model(uri: str, dst: Path) -> Path:
    """A local folder for ``models:/name/version`` or ``models:/name@alias`` (its base/adapter files); local
    paths pass through."""
    if not uri.startswith(("models:/", "runs:/")):
        return Path(uri)
    mlflow = _mlflow()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    # A pyfunc keeps each artifact under its file name (artifacts/<name>/), so look for the diffusers folder.
    # A pyfunc keeps each artifact under its file name (artifacts/<name>/): look for the diffusers folder. The
    # diffusers flavour keeps a LoRA adapter under adapter_weights/.
    for index in [
        *sorted(local.glob("artifacts/*/model_index.json")),
        *sorted(local.glob("*/artifacts/*/model_index.json")),
    ]:
        return index.parent
    if any((local / "adapter_weights").glob("*.safetensors")):
        return local / "adapter_weights"
    return local


# --- the pipeline's parent run ---------------------------------------------------------------------------

PIPELINE_TAG = "mole.pipeline_job"


def _find_pipeline_run(client: Any, experiment_id: str, job_id: str) -> str | None:
    """The run id of the parent run tagged with ``job_id`` in the experiment, or None."""
    if "'" in job_id or "\\" in job_id:  # it goes into a filter string between quotes
        raise ValueError(f"pipeline job id {job_id!r} holds a quote or backslash")
    found = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{job_id}'", max_results=1)
    return found[0].info.run_id if found else None


def _pipeline_run(job_id: str) -> str | None:
    """The parent run of pipeline job ``job_id`` in the configured experiment, or None when there is none (the job
    never got as far as creating it)."""
    experiment = _mlflow().get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    return None if experiment is None else _find_pipeline_run(_client(), experiment.experiment_id, job_id)


def start_pipeline_run(job_id: str, job_name: str, params: Mapping[str, Any]) -> str:
    """Create (or find, when a step is retried) the parent run of pipeline job ``job_id``; it stays RUNNING until
    :func:`finish_pipeline_run`. Stage runs join it through ``MOLE_PARENT_RUN_ID``. Returns its run id."""
    experiment = _mlflow().set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    client = _client()
    found = _find_pipeline_run(client, experiment.experiment_id, job_id)
    if found is not None:
        return found
    run = client.create_run(experiment.experiment_id, run_name=job_name or f"pipeline-{job_id}",
                            tags={PIPELINE_TAG: job_id, "mole.stage": "pipeline"})  # fmt: skip
    flat = list(redact_params(params).items())
    for i in range(0, len(flat), 100):
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat[i : i + 100]])
    return run.info.run_id


def finish_pipeline_run(job_id: str, state: str, error: str | None = None) -> str | None:
    """Mark the parent run of ``job_id`` FINISHED (``state`` SUCCEEDED) or FAILED (anything else), with the
    error as a tag. Returns its run id, or None when the job never got as far as creating it."""
    run_id = _pipeline_run(job_id)
    if run_id is None:
        return None
    client = _client()
    client.set_tag(run_id, "mole.pipeline_state", state)
    if error:
        client.set_tag(run_id, "mole.pipeline_error", redact(error)[:5000])
    client.set_terminated(run_id, "FINISHED" if state == "SUCCEEDED" else "FAILED")
    return run_id


def log_pipeline_artifacts(job_id: str, folder: str | os.PathLike[str], artifact_path: str) -> str | None:
    """Store ``folder`` (the run report) as artifacts of the parent run of ``job_id``. Returns its run id, or None
    when that job has no parent run."""
    run_id = _pipeline_run(job_id)
    if run_id is None:
        return None
    client = _client()
    client.log_artifacts(run_id, str(folder), artifact_path)
    return run_id


# --- promotion ---------------------------------------------------------------------------------------------


def model_metric(name: str, version: str, metric: str) -> float | None:
    """The metric of a version: its ``mole.metric.<metric>`` tag, else the metric of its source run."""
    client = _client()
    mv = client.get_model_version(name, version)
    if f"mole.metric.{metric}" in (mv.tags or {}):
        return float(mv.tags[f"mole.metric.{metric}"])
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def promote(
    metric: str, name: str = "mole", candidate: str = "candidate", champion: str = "champion",
    baseline: str | None = None, higher_is_better: bool = True, version: str | None = None,
) -> tuple[bool, str]:  # fmt: skip
    """Move ``champion`` to ``version`` (default: the version ``candidate`` points to) only if it beats the current
    champion (or, with no champion yet, ``baseline`` — e.g. ``models:/mole-stage1/3``'s score — when given).

    A pipeline passes the ``version`` its own gates step registered: the ``candidate`` alias is shared by every
    run, so two concurrent runs reading it could promote each other's model. MLflow has no compare-and-set on
    aliases either, so a version that clears the bar is recorded as a contender (a ``mole.promotion.request``
    tag) and :func:`_settle` points ``champion`` at the best contender, re-reading after each write until a read
    that follows its own write agrees: whatever the interleaving of concurrent promotions, the last of them
    leaves ``champion`` on the best-scoring contender, never on a worse one that happened to write last.

    Returns:
        (moved, why): ``moved`` is True when ``champion`` ends on ``version``.
    """
    client = _client()
    if version is None:
        try:
            version = client.get_model_version_by_alias(name, candidate).version
        except Exception as err:  # MlflowException for a missing alias
            return False, f"no {name}@{candidate} to promote ({err})"
    version = str(version)
    cand_score = model_metric(name, version, metric)
    if cand_score is None:
        return False, f"{name} version {version} has no {metric!r} score; evaluate it first"
    champ = _alias_or_none(name, champion)
    ref_name: str | None = None
    if champ is not None:
        ref_name, ref_version, label = name, champ, f"champion (version {champ})"
    elif baseline is not None:
        try:
            ref = model_version(baseline, "baseline")
        except ValueError as err:
            return False, str(err)
        ref_name, ref_version, label = ref.name, ref.version, f"baseline {baseline}"
    if champ == version:
        return False, f"version {version} is already {champion}"
    if ref_name is not None:
        ref_score = model_metric(ref_name, ref_version, metric)
        if ref_score is not None and not _better(cand_score, ref_score, higher_is_better):
            return False, (f"candidate version {version} {metric}={cand_score:.4f} does not beat "
                           f"{label} {metric}={ref_score:.4f}; {champion} left unchanged")  # fmt: skip
    import time

    # Whole seconds, rounded down: a rounded-up stamp would lie in the future and count as recent in any window.
    client.set_model_version_tag(name, version, PROMOTION_TAG, f"{metric} {int(time.time())}")
    winner, score = _settle(name, champion, metric, higher_is_better, version)
    if winner != version:
        return False, (f"candidate version {version} {metric}={cand_score:.4f} cleared the bar, but a concurrent "
                       f"promotion's version {winner} scores better ({metric}={score:.4f}); "
                       f"{champion} -> {winner}")  # fmt: skip
    return True, f"{champion} -> version {version} ({metric}={cand_score:.4f})"


#: Tag on a model version that cleared the promotion bar: ``"<metric> <unix time>"`` (see :func:`promote`).
PROMOTION_TAG = "mole.promotion.request"
#: Contenders older than this are history, not concurrent promotions: a champion set back by hand (a rollback)
#: is not undone by the next run's promotion.
PROMOTION_WINDOW_S = 3600.0


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def _alias_or_none(name: str, alias: str) -> str | None:
    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except Exception:  # MlflowException: no such alias (yet)
        return None


def _settle(
    name: str, champion: str, metric: str, higher_is_better: bool, mine: str, rounds: int = 20
) -> tuple[str, float]:
    """Point ``champion`` at the best of the recent contenders for ``metric`` (``mine`` among them) and the current
    champion; repeat until a read made after this process's last write finds ``champion`` already on the best.
    Ties go to the newer version. Returns the winner and its score."""
    import time

    client = _client()
    for _ in range(rounds):
        scored: dict[str, float] = {}
        for mv in client.search_model_versions(f"name='{name}'"):
            tag_metric, _, stamp = (mv.tags or {}).get(PROMOTION_TAG, "").partition(" ")
            recent = stamp.isdigit() and time.time() - int(stamp) < PROMOTION_WINDOW_S
            if tag_metric == metric and (recent or str(mv.version) == mine):
                score = model_metric(name, str(mv.version), metric)
                if score is not None:
                    scored[str(mv.version)] = score
        current = _alias_or_none(name, champion)
        if current is not None and current not in scored:
            score = model_metric(name, current, metric)
            if score is not None:
                scored[current] = score
        sign = 1.0 if higher_is_better else -1.0
        best = max(scored, key=lambda v: (sign * scored[v], int(v)))
        if current == best:
            return best, scored[best]
        client.set_registered_model_alias(name, champion, best)
        time.sleep(0.05)  # let a concurrent writer's alias land before the confirming read
    raise RuntimeError(f"{name}@{champion} did not settle after {rounds} rounds of concurrent promotions")


def alias_version(name: str, alias: str) -> str:
    return _client().get_model_version_by_alias(name, alias).version


def set_model_metric(name: str, version: str, metric: str, value: float) -> None:
    _client().set_model_version_tag(name, version, f"mole.metric.{metric}", str(value))


# --- lineage ------------------------------------------------------------------------------------------------


def lineage(model_uri: str) -> list[dict[str, Any]]:
    """Walk from a registered model back to the curated datasets: one entry per stage run."""
    client = _client()
    ref = parse_model_uri(model_uri)
    if ref is None:
        raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri!r}")
    mv = _model_version_of(ref)
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    todo = [(mv.run_id, f"{ref.name} version {mv.version}")]
    while todo:
        run_id, via = todo.pop(0)
        if not run_id or run_id in seen:
            continue
        seen.add(run_id)
        run = client.get_run(run_id)
        tags = run.data.tags
        datasets = []
        for d in run.inputs.dataset_inputs:
            digest = next((t.value for t in d.tags if t.key == "mole.digest"), d.dataset.digest)
            source = json.loads(d.dataset.source).get("uri", d.dataset.source) if d.dataset.source else None
            datasets.append({"name": d.dataset.name, "digest": digest, "source": source})
        upstream = {k[len("mole.upstream.") :]: v for k, v in tags.items() if k.startswith("mole.upstream.")}
        chain.append({"stage": tags.get("mole.stage", run.info.run_name), "run_id": run_id, "via": via,
                      "upstream": upstream, "datasets": datasets})  # fmt: skip
        todo += [(rid, name) for name, rid in sorted(upstream.items())]
    return chain


def format_lineage(chain: list[dict[str, Any]]) -> str:
    lines = []
    for step in chain:
        lines.append(f"{step['stage']:<14} run {step['run_id']}  ({step['via']})")
        for name, rid in step["upstream"].items():
            lines.append(f"    <- {name}: run {rid}")
        for d in step["datasets"]:
            lines.append(f"    dataset {d['name']} digest {d['digest']} ({d['source']})")
    return "\n".join(lines)


def log_to_run(run_id: str, metrics: Mapping[str, float], artifacts: list[Path], artifact_path: str,
               tags: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """Add metrics, artifacts and tags to an existing (possibly finished) run: what a later analysis of a stage's
    output, such as a user study of an evaluation, learned about it. The run is not reopened."""
    import time

    from mlflow.entities import Metric, RunTag

    client = _client()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])  # fmt: skip
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path)
