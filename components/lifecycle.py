"""Opening and closing a pipeline run: the working folder, the MLflow parent run, the embedded default."""

from typing import NamedTuple

from kfp import dsl

from components.constants import IMAGE


class StartOutputs(NamedTuple):
    parent_run_id: str
    workdir: str
    base_model: str
    prompts: str
    scorer_config: str


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_op(
    workspace: str, job_id: str, job_name: str, base_model: str, prompts: str, scorer_config: str, params: dict,
    tracking_uri: str, experiment: str,
) -> NamedTuple(
    "StartOutputs", [("parent_run_id", str), ("workdir", str), ("base_model", str), ("prompts", str),
                     ("scorer_config", str)]
):  # fmt: skip
    from collections import namedtuple

    from mole.pipeline import steps

    out = steps.start(workspace, job_id, job_name, base_model, prompts, scorer_config, params, tracking_uri,
                      experiment)  # fmt: skip
    return namedtuple("StartOutputs", list(out))(**out)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_op(job_id: str, tracking_uri: str, experiment: str, status: dsl.PipelineTaskFinalStatus) -> str:
    from mole.pipeline import steps

    return steps.finish(job_id, status.state, status.error_message or "", tracking_uri, experiment)
