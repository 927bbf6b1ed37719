"""Opening and closing a pipeline run: the working folder, the MLflow parent run, the embedded default."""

from typing import NamedTuple

from kfp import dsl

from mole.pipeline.components.constants import IMAGE


class StartOutputs(NamedTuple):
    parent_run_id: str
    workdir: str
    base_model: str
    prompts: str
    scorer_config: dict


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_op(
    workspace: str, job_id: str, job_name: str, base_model: str, prompts: str, scorer_config: dict, params: dict,
    gpus: int, gpus_per_node: int, stage1_launcher: str, stage1_nodes: int, tracking_uri: str, experiment: str,
) -> NamedTuple(
    "StartOutputs", [("parent_run_id", str), ("workdir", str), ("base_model", str), ("prompts", str),
                     ("scorer_config", dict)]
):  # fmt: skip
    from collections import namedtuple

    from mole.pipeline import steps

    steps.check_gpus(gpus, gpus_per_node, stage1_launcher, stage1_nodes)
    out = steps.start(workspace, job_id, job_name, base_model, prompts, scorer_config, params, tracking_uri,
                      experiment)  # fmt: skip
    return namedtuple("StartOutputs", list(out))(**out)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_op(job_id: str, tracking_uri: str, experiment: str, status: dsl.PipelineTaskFinalStatus) -> str:
    from mole.pipeline import steps

    return steps.finish(job_id, status.state, status.error_message or "", tracking_uri, experiment)
