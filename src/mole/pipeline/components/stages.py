"""Data and the three training stages."""

from typing import NamedTuple

from kfp import dsl

from mole.pipeline.components.constants import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_op(
    kind: str, workspace: str, source: str, raw_inputs: dict, curate_config: str, count: int, data_root: str,
    timeouts: dict, tracking_uri: str, experiment: str,
) -> str:  # fmt: skip
    """Cached: every input defines the dataset; nothing here is per run."""
    from mole.pipeline import steps

    with steps.deadline("data", timeouts):
        return steps.data(kind, workspace, source, raw_inputs, curate_config, count, 0, data_root,
                          tracking_uri=tracking_uri, experiment=experiment)  # fmt: skip


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def stage1_op(
    config: str, data: str, base_model: str, workdir: str, max_steps: int, launcher: str, gpus: int, nodes: int,
    job_id: str, namespace: str, image: str, node_selector: dict, tolerations: list, workspace_pvc: str,
    workspace: str, timeout_s: int, parent_run_id: str, tracking_uri: str, experiment: str, s3_secret: str,
    mlflow_secret: str, timeouts: dict,
) -> str:  # fmt: skip
    from mole.pipeline import steps

    if launcher == "local":
        with steps.deadline("stage1", timeouts):
            return steps.train("stage1", config, data, base_model, workdir, max_steps=max_steps, processes=gpus,
                               parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                               experiment=experiment)  # fmt: skip
    # The multi-node job has its own deadline (timeout_s): on expiry the job is deleted, then this step fails.
    return steps.stage1_distributed(
        config, data, base_model, workdir, flavour=launcher, job_name=f"mole-stage1-{job_id}"[:63].rstrip("-"),
        namespace=namespace, image=image, nodes=nodes, gpus_per_node=gpus, node_selector=node_selector,
        tolerations=tolerations, pvc=workspace_pvc, mount_path=workspace, max_steps=max_steps, timeout_s=timeout_s,
        parent_run_id=parent_run_id, tracking_uri=tracking_uri, experiment=experiment, s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
    )  # fmt: skip


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def expert_op(
    name: str, config: str, data: str, base_model: str, workdir: str, max_steps: int, gpus: int, timeouts: dict,
    parent_run_id: str, tracking_uri: str, experiment: str,
) -> str:  # fmt: skip
    """Returns ``NAME=URI`` for the gates step."""
    from mole.pipeline import steps

    with steps.deadline("expert", timeouts):
        uri = steps.train("expert", config, data, base_model, workdir, expert=name, max_steps=max_steps,
                          processes=gpus, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                          experiment=experiment)  # fmt: skip
    return f"{name}={uri}"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gates_op(
    config: str, data: str, base_model: str, experts: list, gate: str, gate_condition: str, workdir: str,
    max_steps: int, gpus: int, timeouts: dict, parent_run_id: str, tracking_uri: str, experiment: str,
) -> NamedTuple("GatesOutputs", [("model", str), ("gates", str)]):  # fmt: skip
    """Returns ``model``, the MoLE version this run registered (``models:/mole/N``, aliased ``candidate``; ""
    with tracking off), and ``gates``, the trained gates file (always)."""
    from collections import namedtuple

    from mole.pipeline import steps

    with steps.deadline("gates", timeouts):
        out = steps.train_gates(config, data, base_model, workdir, experts=experts, gate=gate, max_steps=max_steps,
                                processes=gpus, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                                experiment=experiment, condition=gate_condition)  # fmt: skip
    return namedtuple("GatesOutputs", list(out))(**out)
