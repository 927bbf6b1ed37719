"""Thin Kubeflow Pipelines components: a signature and one call into ``mole.pipeline.steps``; no logic here.

Each is a containerized Python component on the mole image (``mole.pipeline.components.constants.IMAGE``)
with kfp already installed in it, so nothing is pip-installed at run time. These modules do not use
``from __future__ import annotations``: kfp reads the parameter types from the real annotations.
"""

from mole.pipeline.components.evaluate import evaluate_baseline_op, evaluate_op, promote_op
from mole.pipeline.components.lifecycle import finish_op, start_op
from mole.pipeline.components.stages import data_op, expert_op, gates_op, stage1_op

__all__ = [
    "data_op",
    "evaluate_baseline_op",
    "evaluate_op",
    "expert_op",
    "finish_op",
    "gates_op",
    "promote_op",
    "stage1_op",
    "start_op",
]
