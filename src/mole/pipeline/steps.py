"""The pipeline's steps: what each Kubeflow component calls, with plain, JSON-able arguments and results.

Every step is idempotent under a retry: a stage resumes from its checkpoints (``--resume latest``), a dataset that
is already complete is kept, the parent run is found again by its job id. Steps share a working folder
(``<workspace>/runs/<job id>``: a ReadWriteMany PVC on a cluster, a local folder in ``mole pipeline run-local``)
and hand models to each other as registry URIs (``models:/mole-stage1/3``) when tracking is on, else as paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mole.pairs import parse_pairs
from mole.security import check_name, redact
from mole.uris import is_model_uri, model_version, parse_model_uri

logger = logging.getLogger(__name__)

#: Human-centric prompts for the embedded default's evaluation (faces, hands, people).
EMBEDDED_PROMPTS = [
    "a close-up photo of a smiling woman", "a close-up photo of an old man with a beard", "a portrait of a girl",
    "a hand making a fist", "a close-up photo of a hand waving", "a boy raising his hand",
    "two people standing in a park", "a man and a woman walking in a street",
]  # fmt: skip


def _tracking(tracking_uri: str = "", experiment: str = "", parent_run_id: str = "") -> None:
    """Point this process's tracking at the pipeline's server, experiment and parent run."""
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    if experiment:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    if parent_run_id:
        os.environ["MOLE_PARENT_RUN_ID"] = parent_run_id


#: Exit code of a step killed by its deadline (as coreutils' timeout).
TIMEOUT_EXIT = 124


@contextlib.contextmanager
def deadline(kind: str, timeouts: Mapping[str, Any] | None) -> Iterator[None]:
    """Bound a step by ``timeouts[kind]`` seconds (the pipeline's ``step_timeouts``; absent or 0: no bound).

    On expiry the step logs which bound it hit, ends its child processes (``accelerate launch`` workers) and
    exits with :data:`TIMEOUT_EXIT` from a watchdog thread, so that it stops holding its GPUs even when the main
    thread is stuck in a CUDA call or a collective that no Python exception would interrupt.
    """
    seconds = float((timeouts or {}).get(kind) or 0)
    if seconds < 0:
        raise ValueError(f"step_timeouts[{kind!r}] must be 0 (none) or positive seconds, got {seconds:g}")
    if not seconds:
        yield
        return

    def expire() -> None:
        logger.error("the %s step ran past its timeout of %.0f s (pipeline parameter step_timeouts[%r]); stopping it",
                     kind, seconds, kind)  # fmt: skip
        for handler in logging.getLogger().handlers:
            handler.flush()
        for child in list(_CHILDREN):
            with contextlib.suppress(OSError):
                os.killpg(child.pid, 9)
        os._exit(TIMEOUT_EXIT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


#: Child process groups of this step (ended by :func:`deadline` on expiry).
_CHILDREN: set[subprocess.Popen] = set()


def check_gpus(gpus: int, gpus_per_node: int, stage1_launcher: str = "local", stage1_nodes: int = 1) -> None:
    """Refuse a GPU count the pool cannot give before anything runs: a pod asking more GPUs than one node has
    stays Pending forever (the chart's gpuPool.gpusPerNode is passed as ``gpus_per_node``)."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    if gpus > gpus_per_node:
        raise ValueError(
            f"gpus={gpus} cannot be scheduled: a node of the GPU pool has gpus_per_node={gpus_per_node} GPUs and a "
            f"pod cannot span nodes; use gpus<={gpus_per_node} (for more, stage1_launcher=trainjob with "
            "stage1_nodes=N spreads stage 1 over N nodes)"
        )
    if stage1_launcher != "local" and stage1_nodes < 1:
        raise ValueError(f"stage1_nodes must be at least 1, got {stage1_nodes}")


def _resolve_config(config: str) -> Path:
    """A config path as given, else the preset the package ships under that name (see :mod:`mole.presets`)."""
    from mole.presets import resolve

    return resolve(config)


def start(
    workspace: str, job_id: str, job_name: str, base_model: str, prompts: str,
    scorer_config: Mapping[str, Any] | str | None, params: dict[str, Any], tracking_uri: str = "",
    experiment: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Open the pipeline: its working folder, its MLflow parent run and, for ``base_model == "tiny"``, the embedded
    default (tiny SD model, tiny CLIP scorer, a prompt file).

    Returns:
        ``parent_run_id`` ("" with tracking off), ``workdir``, ``base_model``, ``prompts``, ``scorer_config``
        (a dict: the pipeline's parameter is typed, since ``kfp run create`` decodes JSON parameter values).
    """
    from mole import tracking

    _tracking(tracking_uri, experiment)
    workdir = Path(workspace) / "runs" / job_id
    workdir.mkdir(parents=True, exist_ok=True)
    parent = tracking.start_pipeline_run(job_id, job_name, params) if tracking.enabled() else ""
    if base_model == "tiny":
        from mole.tiny import init_tiny_clip, init_tiny_model

        base_model = str(init_tiny_model(workdir / "embedded" / "model", overwrite=True))
        clip = init_tiny_clip(workdir / "embedded" / "clip", overwrite=True)
        conf = _json_dict(scorer_config, "scorer_config")
        conf.setdefault("clip", {}).setdefault("model", str(clip))
        scorer_config = conf
        if not prompts:
            prompts = str(workdir / "embedded" / "prompts.txt")
            Path(prompts).write_text("\n".join(EMBEDDED_PROMPTS) + "\n", encoding="utf-8")
    logger.info("pipeline job %s: workdir %s, parent run %s", job_id, workdir, parent or "(tracking off)")
    return {"parent_run_id": parent, "workdir": str(workdir), "base_model": base_model, "prompts": prompts,
            "scorer_config": _json_dict(scorer_config, "scorer_config")}  # fmt: skip


def _json_dict(value: Mapping[str, Any] | str | None, what: str) -> dict[str, Any]:
    """A structured parameter as a dict: already decoded (typed kfp parameter) or JSON text (older callers)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be an object (a dict), got {type(value).__name__}")
    return dict(value)


def dataset_key(kind: str, source: str, raw: str, curate_config: str, count: int, seed: int) -> str:
    """What defines a dataset, hashed: the same inputs give the same folder in every run (the data steps'
    cache), different ones never share it. The curation config counts by its content, not its name."""
    recipe = _resolve_config(curate_config).read_text(encoding="utf-8") if source == "curate" and curate_config else ""
    blob = json.dumps({"kind": kind, "source": source, "raw": raw if source == "curate" else "", "recipe": recipe,
                       "count": count if source == "synthetic" else 0, "seed": seed}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data(
    kind: str, workspace: str, source: str, raw_inputs: dict[str, str], curate_config: str = "", count: int = 64,
    seed: int = 0, data_root: str = "", parent_run_id: str = "", tracking_uri: str = "", experiment: str = "",
) -> str:  # fmt: skip
    """One dataset: ``source == "synthetic"`` draws the embedded default's data, ``"curate"`` curates
    ``raw_inputs[kind]`` (a folder or ``s3://`` prefix). Returns the dataset's URI.

    The dataset goes to ``data_root/<kind>`` or ``<workspace>/data/<kind>-<dataset_key>``: never into a run's
    folder, so that the step's cached output (KFP caches it on its inputs) stays valid for the next run.
    Synthetic data still gets a ``curate:<kind>`` run, so that the lineage of every model reaches its data.
    """
    from mole import tracking
    from mole.data.shards import read_index

    _tracking(tracking_uri, experiment, parent_run_id)
    check_name(kind, "data kind")  # it becomes a folder and a prefix below
    if source not in ("synthetic", "curate"):
        raise ValueError(f"data source must be 'synthetic' or 'curate', got {source!r}")
    raw = (raw_inputs or {}).get(kind, "")
    key = dataset_key(kind, source, raw, curate_config, count, seed)
    output = f"{data_root.rstrip('/')}/{kind}" if data_root else str(Path(workspace) / "data" / f"{kind}-{key}")
    if source == "synthetic":
        from mole.data.synthetic import write_dataset

        if "://" not in output and (Path(output) / "dataset.json").is_file():
            return output  # a retried step: the dataset is complete (dataset.json is written last)
        run = tracking.StageRun(f"curate:{kind}") if tracking.enabled() else None
        with run if run is not None else _null():
            extra = {"mlflow_run_id": run.run_id} if run else {}
            index = write_dataset(output, kind, count, seed=seed, overwrite=True, extra_meta=extra)
            if run is not None:
                run.log_params({"kind": kind, "source": "synthetic", "count": count, "seed": seed, "output": output})
                run.log_dataset(output, index.name, index.digest, context="output")
        return output
    if not raw:
        raise ValueError(f"no raw input for {kind!r}: set raw_inputs={{'{kind}': 's3://...'}}")
    import yaml

    from mole.data.curate import CurateConfig, curate_tracked
    from mole.storage import localize

    tree = yaml.safe_load(_resolve_config(curate_config).read_text(encoding="utf-8")) if curate_config else {}
    local_in = localize(raw, Path(workspace) / ".cache" / "raw" / f"{kind}-{key}")
    if "://" not in output and (Path(output) / "dataset.json").is_file() and read_index(output).num_samples:
        return output
    curate_tracked(kind, raw, output, local_in, CurateConfig.model_validate(tree or {}))
    return output


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _model_of(out: Path, fallback: Path) -> str:
    """What the next stage should load: the registry URI when the stage registered one, else the local path."""
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    return str(result.get("model_uri") or fallback)


def train(
    stage: str, config: str, data: str, base_model: str, workdir: str, *, expert: str = "",
    experts: list[str] | None = None, gate: str = "", max_steps: int = 0, processes: int = 1,
    parent_run_id: str = "", tracking_uri: str = "", experiment: str = "", condition: str = "",
) -> str:  # fmt: skip
    """Train one stage in this pod: in-process for one process, under ``accelerate launch`` with DeepSpeed ZeRO-2
    across ``processes`` GPUs otherwise. Returns the model URI (or path) for the next stage.

    ``experts`` are ``NAME=URI`` strings (the expert steps' results), any number of them; ``condition`` is the
    gates' ``none``/``timestep`` (empty: the config's).
    """
    _tracking(tracking_uri, experiment, parent_run_id)
    if stage == "expert":
        check_name(expert, "expert")  # a pipeline parameter: it becomes the folder below
    for name in parse_pairs(experts, "experts"):
        check_name(name, "experts")
    out = Path(workdir) / (f"expert-{expert}" if stage == "expert" else stage)
    args = mole_train_args(stage, config, data, base_model, out, expert=expert, experts=experts, gate=gate,
                           max_steps=max_steps, condition=condition)  # fmt: skip
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(_resolve_config("configs/accelerate/zero2.yaml")), "--num_processes", str(processes),
               "-m", "mole", *args]  # fmt: skip
        logger.info("running %s", redact(" ".join(cmd)))
        # Its own process group, so that a step deadline ends the launcher and every worker it started.
        proc = subprocess.Popen(cmd, start_new_session=True)
        _CHILDREN.add(proc)
        try:
            code = proc.wait()
        finally:
            _CHILDREN.discard(proc)
        if code:
            raise subprocess.CalledProcessError(code, cmd)
    else:
        from mole.train import load_config, train_stage
        from mole.train.config import parse_data

        train_stage(
            stage, load_config(_resolve_config(config), {}), output=out, data=parse_data(data),
            base=base_model or None, max_steps=max_steps or None, resume="latest", expert_name=expert or None,
            experts=parse_pairs(experts, "experts") or None, gate=gate or None,
            condition=condition or None,
        )  # fmt: skip
    fallback = out / "model" if stage == "stage1" else out
    if stage == "gates":
        fallback = out / "gates.safetensors"
    return _model_of(out, fallback)


def train_gates(
    config: str, data: str, base_model: str, workdir: str, *, experts: list[str], gate: str = "", max_steps: int = 0,
    processes: int = 1, parent_run_id: str = "", tracking_uri: str = "", experiment: str = "", condition: str = "",
) -> dict[str, str]:  # fmt: skip
    """The gates stage (see :func:`train`), handing back each result under its own name, whatever tracking does.

    Returns:
        ``model``: the MoLE version this run registered (``models:/mole/N``), "" with tracking off;
        ``gates``: the gates file, always (what evaluating base + experts + gates needs without a registry).
    """
    model = train("gates", config, data, base_model, workdir, experts=experts, gate=gate, max_steps=max_steps,
                  processes=processes, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                  experiment=experiment, condition=condition)  # fmt: skip
    gates_file = Path(workdir) / "gates" / "gates.safetensors"
    return {"model": model if is_model_uri(model) else "", "gates": str(gates_file)}


def mole_train_args(
    stage: str, config: str, data: str, base_model: str, out: Path, *, expert: str = "",
    experts: list[str] | None = None, gate: str = "", max_steps: int = 0, condition: str = "",
) -> list[str]:  # fmt: skip
    """The ``mole train ...`` arguments of a stage (shared by the in-pod and the multi-node launch)."""
    args = ["train", stage, "--config", str(_resolve_config(config).resolve()), "--data", data, "--output", str(out),
            "--resume", "latest"]  # fmt: skip
    if base_model:
        args += ["--base", base_model]
    if stage == "expert":
        args += ["--name", expert]
    for spec in experts or []:
        args += ["--experts", spec]
    if gate:
        args += ["--gate", gate]
    if condition:
        args += ["--condition", condition]
    if max_steps:
        args += ["--max-steps", str(max_steps)]
    return args


def stage1_distributed(
    config: str, data: str, base_model: str, workdir: str, *, flavour: str, job_name: str, namespace: str,
    image: str, nodes: int, gpus_per_node: int, node_selector: dict[str, str], tolerations: list[dict[str, Any]],
    pvc: str, mount_path: str, max_steps: int = 0, timeout_s: float = 7 * 24 * 3600, parent_run_id: str = "",
    tracking_uri: str = "", experiment: str = "", s3_secret: str = "", mlflow_secret: str = "",
) -> str:  # fmt: skip
    """Stage 1 on ``nodes`` × ``gpus_per_node`` GPUs as a TrainJob / PyTorchJob (see :mod:`mole.pipeline.trainjob`);
    waits for it and returns the stage-1 model URI from the shared workspace."""
    from mole.pipeline.trainjob import DistributedSpec, run_distributed
    from mole.tracking import DEFAULT_EXPERIMENT

    out = Path(workdir) / "stage1"
    namespace = namespace or own_namespace()
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "") or DEFAULT_EXPERIMENT
    env = {"MOLE_PARENT_RUN_ID": parent_run_id, "MLFLOW_EXPERIMENT_NAME": experiment,
           "TORCH_EXTENSIONS_DIR": f"{mount_path}/.cache/torch_extensions"}  # fmt: skip
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    secret_env = {}
    if s3_secret:
        secret_env[s3_secret] = {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        }
    if mlflow_secret:
        secret_env[mlflow_secret] = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                     "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}  # fmt: skip
    spec = DistributedSpec(
        name=job_name, namespace=namespace, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
        mole_args=mole_train_args("stage1", config, data, base_model, out, max_steps=max_steps),
        node_selector=node_selector or {}, tolerations=tolerations or [], env=env, secret_env=secret_env,
        required_secrets=[mlflow_secret] if mlflow_secret else [],
        pvc=pvc or None, mount_path=mount_path,
        # The installed package's copy: the job's pods run this same image, whatever their working folder.
        accelerate_config=str(_resolve_config("configs/accelerate/zero2.yaml").resolve()),
    )  # fmt: skip
    if flavour not in ("trainjob", "pytorchjob"):
        raise ValueError(f"stage-1 launcher must be local, trainjob or pytorchjob, got {flavour!r}")
    run_distributed(spec, flavour, timeout_s=timeout_s)  # type: ignore[arg-type]
    if not (out / "result.json").is_file():
        raise RuntimeError(f"the distributed stage 1 finished but left no {out / 'result.json'}: is {mount_path} "
                           "the same ReadWriteMany volume in the job's pods and in this step?")  # fmt: skip
    return _model_of(out, out / "model")


def own_namespace(path: str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace") -> str:
    """The namespace this pod runs in: where KFP runs the pipeline (``kubeflow`` standalone, the profile
    namespace multi-user), and so where the multi-node job belongs."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        raise ValueError("the `namespace` parameter is empty and this is not a pod with a service-account "
                         f"namespace file ({path}): set namespace=...") from None  # fmt: skip


def evaluate(
    model: str, base_model: str, experts: list[str], gates: str, prompts: str, workdir: str, *, scorers: str,
    scorer_config: Mapping[str, Any] | str | None, num_prompts: int, repeats: int, steps: int, seed: int = 0,
    compile_unet: bool = False, parent_run_id: str = "", tracking_uri: str = "", experiment: str = "",
    label: str = "mole", output: str = "evaluate",
) -> str:  # fmt: skip
    """Evaluate a model: the registered version when ``model`` is a ``models:/`` URI, else base + experts + gates
    (the base alone with no experts and no gates, as for the stage-1 baseline); scores go onto the registered
    version for promotion. Images and scores go under ``workdir/output``. Returns the report as JSON."""
    from mole.evaluate.runner import EvalSettings, evaluate_tracked
    from mole.storage import localize

    _tracking(tracking_uri, experiment, parent_run_id)
    if prompts.startswith("s3://"):
        folder = localize(prompts.rsplit("/", 1)[0], Path(workdir) / ".cache" / "prompts")
        prompts = str(folder / prompts.rsplit("/", 1)[1])
    registered = is_model_uri(model)
    settings = EvalSettings(
        model=model if registered else base_model,
        experts={} if registered else parse_pairs(experts, "experts"),
        gates=None if registered or not gates else gates,
        prompts=prompts, num_prompts=num_prompts, repeats=repeats, seed=seed, steps=steps,
        scorers=[s.strip() for s in scorers.split(",") if s.strip()],
        scorer_config=_json_dict(scorer_config, "scorer_config"),
        label=label, compile_unet=compile_unet,
    )  # fmt: skip
    report = evaluate_tracked(settings, Path(workdir) / output)
    return json.dumps({k: report[k] for k in ("label", "num_prompts", "repeats", "scores")})


def promote(
    metric: str, report: str, model: str, tracking_uri: str = "", experiment: str = "", baseline: str = "",
    serve_deployment: str = "", serve_replicas: int = 1, namespace: str = "",
) -> str:  # fmt: skip
    """Move ``mole@champion`` to ``model`` — the version this run registered (``models:/mole/N``) — when it beats
    the champion or, with no champion yet, the ``baseline`` (the evaluated stage-1 version,
    ``models:/mole-stage1/N``). Race-free against concurrent runs (see :func:`mole.tracking.promote`). When it
    moved and ``serve_deployment`` names the generation service's Deployment, that is rolled onto the new
    version (and scaled up from zero: see :mod:`mole.pipeline.rollout`). Returns what happened."""
    from mole import tracking

    _tracking(tracking_uri, experiment)
    scores = json.loads(report)["scores"]
    metric = metric or next(iter(scores))
    if metric not in scores:
        raise ValueError(f"promotion metric {metric!r} was not evaluated (scores: {sorted(scores)})")
    if not tracking.enabled() or not is_model_uri(model):
        why = f"tracking is off: nothing registered to promote ({metric}={scores[metric]['mean']:.4f})"
        logger.info(why)
        return why
    # The version this run's gates step registered, never the shared `candidate` alias: a concurrent run may
    # have moved that since.
    own = model_version(model, "promote needs the registered version of this run: model")
    # A baseline that is not a registered version (stage 1 from a local path) cannot hold a score: skip it.
    ref = parse_model_uri(baseline)
    reference = baseline if ref is not None and ref.version else None
    moved, why = tracking.promote(metric, name=own.name, baseline=reference, version=own.version)
    logger.info(why)
    if moved and serve_deployment:
        from mole.pipeline.rollout import roll_out

        why += "; " + roll_out(serve_deployment, namespace or own_namespace(), own.name, own.version, serve_replicas)
    return why


def finish(job_id: str, state: str, error: str = "", tracking_uri: str = "", experiment: str = "") -> str:
    """The exit handler: mark the parent run FINISHED or FAILED with the pipeline's final state."""
    from mole import tracking

    _tracking(tracking_uri, experiment)
    if not tracking.enabled():
        return state
    run_id = tracking.finish_pipeline_run(job_id, state, error or None)
    logger.info("pipeline job %s %s; parent run %s closed", job_id, state, run_id)
    return state
