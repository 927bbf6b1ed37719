"""Evaluation of the candidate and of the stage-1 baseline, and the candidate's promotion to champion."""

from kfp import dsl

from mole.pipeline.components.constants import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(
    model: str, gates: str, base_model: str, experts: list, prompts: str, workdir: str, scorers: str,
    scorer_config: dict, num_prompts: int, repeats: int, steps: int, compile_unet: bool, timeouts: dict,
    parent_run_id: str, tracking_uri: str, experiment: str,
) -> str:  # fmt: skip
    """Evaluates the registered version ``model``, or base + experts + ``gates`` when nothing was registered
    (``model`` empty: tracking off). Returns the report (mean ± standard error per scorer) as JSON.
    ``compile_unet``: ``torch.compile`` + CUDA graphs for the UNet (``mole evaluate run --compile``)."""
    from mole.pipeline import steps as mole_steps

    with mole_steps.deadline("evaluate", timeouts):
        return mole_steps.evaluate(
            model, base_model, experts, gates, prompts, workdir, scorers=scorers, scorer_config=scorer_config,
            num_prompts=num_prompts, repeats=repeats, steps=steps, compile_unet=compile_unet,
            parent_run_id=parent_run_id, tracking_uri=tracking_uri, experiment=experiment,
        )  # fmt: skip


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_baseline_op(
    model: str, prompts: str, workdir: str, scorers: str, scorer_config: dict, num_prompts: int, repeats: int,
    steps: int, compile_unet: bool, timeouts: dict, parent_run_id: str, tracking_uri: str, experiment: str,
) -> str:  # fmt: skip
    """The stage-1 model alone on the same prompts, seeds and settings: the bar a first MoLE must clear."""
    from mole.pipeline import steps as mole_steps

    with mole_steps.deadline("evaluate", timeouts):
        return mole_steps.evaluate(
            model, model, [], "", prompts, workdir, scorers=scorers, scorer_config=scorer_config,
            num_prompts=num_prompts, repeats=repeats, steps=steps, compile_unet=compile_unet,
            parent_run_id=parent_run_id, tracking_uri=tracking_uri, experiment=experiment, label="stage 1",
            output="evaluate-stage1",
        )  # fmt: skip


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_op(
    metric: str, report: str, model: str, baseline: str, timeouts: dict, serve_deployment: str, serve_replicas: int,
    namespace: str, tracking_uri: str, experiment: str,
) -> str:  # fmt: skip
    """Promotes ``model``, the version this run registered (never the shared ``candidate`` alias), and rolls the
    generation service onto it."""
    from mole.pipeline import steps

    with steps.deadline("promote", timeouts):
        return steps.promote(metric, report, model, tracking_uri, experiment, baseline=baseline,
                             serve_deployment=serve_deployment, serve_replicas=serve_replicas,
                             namespace=namespace)  # fmt: skip
