"""The MoLE workflow as a Kubeflow Pipelines v2 pipeline.

    start -> data (scenes ∥ faces ∥ hands) -> stage 1 -> (expert face ∥ expert hand ∥ ... ∥ evaluate stage 1)
          -> gates -> evaluate -> promote;  exit handler: finish (the parent MLflow run FINISHED or FAILED)

Promotion moves ``champion`` to the new MoLE version only if it beats the current champion or, on a first run,
the stage-1 model evaluated on the same prompts and seeds.

Compile with ``mole pipeline compile`` or the kfp CLI (``kfp dsl compile --py pipelines/mole_pipeline.py
--function mole_pipeline --output pipelines/mole_pipeline.yaml``: that file only re-exports this module); the
compiled YAML is committed and a test fails when it drifts. No ``from __future__ import annotations`` here: kfp
reads the real parameter types. Experts are fixed at compile time (one parallel task each):
``build_pipeline({"face": "faces", ...})``, or ``mole pipeline compile --expert face=faces --expert hand=hands
--expert feet=feet``. ``gate_condition`` (``none``/``timestep``; empty: the config's ``gates.condition``) chooses
timestep-aware gates.

Placement (kfp-kubernetes): the training steps request ``gpus`` × ``nvidia.com/gpu`` (at most ``gpus_per_node``,
checked by ``start``), the evaluations one GPU, and they land on the GPU pool through ``node_selector`` and
``tolerations`` (dict / list parameters), with a memory-backed ``/dev/shm``; every step mounts the shared workspace
PVC, reads its MLflow user from a required Secret, S3 keys from an optional one (a workload identity may stand in)
and endpoints from a required ConfigMap, all in the namespace the run's pods run in.

Promotion rolls the generation service (``serve_deployment``, set by the chart) onto the new champion and scales
it up from the zero replicas it waits at before the first one.

Caching: only the data steps are cached, and their inputs are exactly what defines a dataset (kind, source, raw
input, curation config, count, where it is written), never the run's id or folder, so a second run with the same
data reuses them. Training steps are retried and resume from their checkpoints. ``step_timeouts`` bounds each
kind of step (seconds; the step ends with exit code 124 and frees its GPUs).
"""

from collections.abc import Mapping

from kfp import dsl, kubernetes

from mole.pipeline.components import (
    data_op,
    evaluate_baseline_op,
    evaluate_op,
    expert_op,
    finish_op,
    gates_op,
    promote_op,
    stage1_op,
    start_op,
)
from mole.pipeline.components.constants import IMAGE

#: Expert name -> the close-up data kind it trains on (the paper's two experts).
DEFAULT_EXPERTS: dict[str, str] = {"face": "faces", "hand": "hands"}
#: Where the workspace PVC is mounted in every step (the ``workspace`` parameter must point inside it on a cluster).
WORKSPACE_MOUNT = "/workspace"
#: A100 nodes as NVIDIA's GPU feature discovery labels them; GKE users give cloud.google.com/gke-accelerator.
A100_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
GPU_TOLERATIONS = [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]  # keys sorted
SHM_SIZE = "16Gi"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
#: The endpoint a step cannot work without (a required ConfigMap key), and those it uses when present.
REQUIRED_ENDPOINTS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
OPTIONAL_ENDPOINTS = {"MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3"}
#: Seconds each kind of step may run (the ``step_timeouts`` parameter); a stuck step must not hold its GPUs.
STEP_TIMEOUTS = {"data": 86400, "evaluate": 86400, "expert": 172800, "gates": 172800, "promote": 3600,
                 "stage1": 604800}  # fmt: skip


def _common(task: dsl.PipelineTask, p: dict, *, cpu: str = "2", memory: str = "8Gi") -> dsl.PipelineTask:
    """What every step gets: the image, the workspace, credentials from Secrets, endpoints from a ConfigMap.

    The MLflow Secret and the ConfigMap's tracking URI are required: without them the pod does not start and
    Kubernetes names what is missing (a silent fall-back would track into a sqlite file inside the pod). Only the
    S3 Secret is optional, for clusters where a workload identity on the runner ServiceAccount provides the keys.
    """
    task.set_container_image(p["image"])
    task.set_cpu_request(cpu).set_memory_request(memory)
    kubernetes.mount_pvc(task, pvc_name=p["workspace_pvc"], mount_path=WORKSPACE_MOUNT)
    kubernetes.use_secret_as_env(task, secret_name=p["s3_secret"], secret_key_to_env=S3_KEYS, optional=True)
    kubernetes.use_secret_as_env(task, secret_name=p["mlflow_secret"], secret_key_to_env=MLFLOW_KEYS, optional=False)
    kubernetes.use_config_map_as_env(task, config_map_name=p["config_map"], config_map_key_to_env=REQUIRED_ENDPOINTS,
                                     optional=False)  # fmt: skip
    kubernetes.use_config_map_as_env(task, config_map_name=p["config_map"], config_map_key_to_env=OPTIONAL_ENDPOINTS,
                                     optional=True)  # fmt: skip
    return task


def _gpu(task: dsl.PipelineTask, p: dict, gpus=None) -> dsl.PipelineTask:
    """A GPU step on the GPU pool: ``gpus`` GPUs (default: the ``gpus`` parameter)."""
    _common(task, p, cpu=p["gpu_cpu"], memory=p["gpu_memory"])
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(p["gpus"] if gpus is None else gpus)
    kubernetes.add_node_selector_json(task, p["node_selector"])
    kubernetes.add_toleration_json(task, p["tolerations"])
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    return task


def _retry(task: dsl.PipelineTask, retries: int) -> dsl.PipelineTask:
    """Retry a step whose failures are mostly transient (object store, tracking server, a preempted node)."""
    if retries <= 0:
        return task
    return task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")


def build_pipeline(
    experts: Mapping[str, str] | None = None,
    name: str = "mole",
    gpu_cpu: str = "8",
    gpu_memory: str = "64Gi",
    retries: int = 3,
):
    """The pipeline function, with one parallel expert task per ``experts`` entry (expert name -> data kind).

    The CPU and memory requests of the GPU steps are fixed at compile time: kfp 2.17 does not carry a parameter
    used only in a resource request into nested DAGs (the exit handler, dsl.If), so as parameters they would not
    resolve.

    ``retries`` is how often every step is retried with exponential backoff from 30 s (a preempted node, a
    restarted tracking server): the I/O-bound ones simply run again, a training step resumes from its newest
    checkpoint in the run's folder, the multi-node launcher adopts its job. The local runner uses 0, where a
    failure is not transient and waiting on the backoff would only delay the error.
    """
    experts = dict(experts or DEFAULT_EXPERTS)
    kinds = ["scenes", *dict.fromkeys(experts.values())]

    @dsl.pipeline(name=name, description="MoLE: stage 1 fine-tune, low-rank experts, soft gates; evaluate; promote.")
    def mole_pipeline(
        config: str = "configs/paper.yaml",
        base_model: str = "",
        data_source: str = "curate",
        raw_inputs: dict = {"faces": "", "hands": "", "scenes": ""},  # noqa: B006 - sorted: kfp sorts some dumps
        curate_config: str = "configs/curate.yaml",
        synthetic_count: int = 64,
        data_root: str = "",
        stage1_max_steps: int = 0,
        stage1_launcher: str = "local",
        stage1_nodes: int = 1,
        stage1_timeout_s: int = 7 * 24 * 3600,
        expert_max_steps: int = 0,
        gates_max_steps: int = 0,
        gate: str = "both",
        gate_condition: str = "",
        prompts: str = "",
        scorers: str = "hps_v1,imagereward",
        scorer_config: dict = {},  # noqa: B006 - kfp reads the default; it is never mutated
        num_prompts: int = 3000,
        repeats: int = 3,
        eval_steps: int = 25,
        eval_compile: bool = False,
        promote_metric: str = "hps_v1",
        image: str = IMAGE,
        namespace: str = "",
        workspace: str = WORKSPACE_MOUNT,
        workspace_pvc: str = "mole-workspace",
        gpus: int = 1,
        gpus_per_node: int = 8,
        step_timeouts: dict = STEP_TIMEOUTS,
        node_selector: dict = A100_SELECTOR,
        tolerations: list = GPU_TOLERATIONS,
        s3_secret: str = "mole-s3",
        mlflow_secret: str = "mole-mlflow",
        config_map: str = "mole-config",
        tracking_uri: str = "",
        experiment: str = "",
        serve_deployment: str = "",
        serve_replicas: int = 1,
    ) -> None:
        p = {"image": image, "workspace_pvc": workspace_pvc, "s3_secret": s3_secret, "mlflow_secret": mlflow_secret,
             "config_map": config_map, "gpus": gpus, "gpu_cpu": gpu_cpu, "gpu_memory": gpu_memory,
             "node_selector": node_selector, "tolerations": tolerations}  # fmt: skip
        track = {"tracking_uri": tracking_uri, "experiment": experiment}
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = _retry(_common(finish_op(job_id=job_id, **track), p), retries).set_caching_options(False)
        finish.set_display_name("finish")
        with dsl.ExitHandler(finish, name="mole"):
            params = {"config": config, "base_model": base_model, "data_source": data_source, "gate": gate,
                      "gate_condition": gate_condition,
                      "stage1_max_steps": stage1_max_steps, "expert_max_steps": expert_max_steps,
                      "gates_max_steps": gates_max_steps, "scorers": scorers, "num_prompts": num_prompts,
                      "repeats": repeats, "image": image}  # fmt: skip
            start = start_op(workspace=workspace, job_id=job_id, job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                             base_model=base_model, prompts=prompts, scorer_config=scorer_config, params=params,
                             gpus=gpus, gpus_per_node=gpus_per_node, stage1_launcher=stage1_launcher,
                             stage1_nodes=stage1_nodes, **track)  # fmt: skip
            _retry(_common(start, p), retries).set_caching_options(False).set_display_name("start")
            run = {"parent_run_id": start.outputs["parent_run_id"], **track}
            workdir, base = start.outputs["workdir"], start.outputs["base_model"]
            data = {}
            for kind in kinds:
                # No per-run input (run id, run folder, parent run): the cache key is what defines the dataset.
                task = data_op(kind=kind, workspace=workspace, source=data_source, raw_inputs=raw_inputs,
                               curate_config=curate_config, count=synthetic_count, data_root=data_root,
                               timeouts=step_timeouts, **track).after(start)  # fmt: skip
                _retry(_common(task, p, cpu="8", memory="32Gi"), retries).set_caching_options(True)
                task.set_display_name(f"data-{kind}")
                data[kind] = task.output
            # Stage 1 and the gates train on the whole human-centric dataset (paper §2): every data step, as
            # NAME=URI entries in one string (kfp resolves the f-string; `mole train --data` splits on ';').
            mixture = ";".join(f"{kind}={data[kind]}" for kind in kinds)

            # One stage-1 component, two placements: in this pod on its GPUs, or a launcher (no GPU of its own)
            # that starts and follows a multi-node TrainJob / PyTorchJob. Only `nodes` differs between them.
            stage1_args = dict(config=config, data=mixture, base_model=base, workdir=workdir,
                               max_steps=stage1_max_steps, launcher=stage1_launcher, gpus=gpus, job_id=job_id,
                               namespace=namespace, image=image, node_selector=node_selector, tolerations=tolerations,
                               workspace_pvc=workspace_pvc, workspace=workspace, timeout_s=stage1_timeout_s,
                               s3_secret=s3_secret, mlflow_secret=mlflow_secret, timeouts=step_timeouts,
                               **run)  # fmt: skip
            with dsl.If(stage1_launcher == "local", name="stage1-in-pod"):
                local = stage1_op(nodes=1, **stage1_args)
                _retry(_gpu(local, p), retries).set_caching_options(False).set_display_name("stage1")
            with dsl.Else(name="stage1-multi-node"):
                launcher = stage1_op(nodes=stage1_nodes, **stage1_args)
                _retry(_common(launcher, p, cpu="1", memory="2Gi"), retries).set_caching_options(False)
                launcher.set_display_name("stage1-launch-trainjob")
            stage1 = dsl.OneOf(local.output, launcher.output)

            expert_specs = []
            for name_, kind in experts.items():
                task = expert_op(name=name_, config=config, data=data[kind], base_model=stage1, workdir=workdir,
                                 max_steps=expert_max_steps, gpus=gpus, timeouts=step_timeouts, **run)  # fmt: skip
                _retry(_gpu(task, p), retries).set_caching_options(False).set_display_name(f"expert-{name_}")
                expert_specs.append(task.output)

            gates = gates_op(config=config, data=mixture, base_model=stage1, experts=expert_specs, gate=gate,
                             gate_condition=gate_condition, workdir=workdir, max_steps=gates_max_steps, gpus=gpus,
                             timeouts=step_timeouts, **run)  # fmt: skip
            _retry(_gpu(gates, p), retries).set_caching_options(False).set_display_name("gates")

            # `model`: the version the gates step registered ("" with tracking off: then base + experts + gates).
            evaluation = evaluate_op(model=gates.outputs["model"], gates=gates.outputs["gates"], base_model=stage1,
                                     experts=expert_specs, prompts=start.outputs["prompts"], workdir=workdir,
                                     scorers=scorers, scorer_config=start.outputs["scorer_config"],
                                     num_prompts=num_prompts,
                                     repeats=repeats, steps=eval_steps, compile_unet=eval_compile,
                                     timeouts=step_timeouts, **run)  # fmt: skip
            # Evaluation generates one image at a time: one GPU, whatever training used.
            _retry(_gpu(evaluation, p, gpus=1), retries).set_caching_options(False).set_display_name("evaluate")

            # Stage 1 alone on the same prompts and seeds, beside the experts: a first MoLE must beat it.
            baseline = evaluate_baseline_op(model=stage1, prompts=start.outputs["prompts"], workdir=workdir,
                                            scorers=scorers, scorer_config=start.outputs["scorer_config"],
                                            num_prompts=num_prompts, repeats=repeats, steps=eval_steps,
                                            compile_unet=eval_compile, timeouts=step_timeouts, **run)  # fmt: skip
            _retry(_gpu(baseline, p, gpus=1), retries).set_caching_options(False)
            baseline.set_display_name("evaluate-stage1")

            # `model` is the version this run's gates step registered: promotion never reads the shared alias.
            promote = promote_op(metric=promote_metric, report=evaluation.output, model=gates.outputs["model"],
                                 baseline=stage1, timeouts=step_timeouts, serve_deployment=serve_deployment,
                                 serve_replicas=serve_replicas, namespace=namespace,
                                 **track).after(baseline)  # fmt: skip
            _retry(_common(promote, p, cpu="1", memory="2Gi"), retries).set_caching_options(False)
            promote.set_display_name("promote")

    return mole_pipeline


mole_pipeline = build_pipeline()
