"""The pipeline for the kfp CLI: ``kfp dsl compile --py pipelines/mole_pipeline.py --function mole_pipeline``.

The definition lives in the package (:mod:`mole.pipeline.dsl`, components in :mod:`mole.pipeline.components`);
this file only re-exports it, so that the kfp CLI, which takes a file path, finds it. ``mole pipeline compile``
does the same without it.
"""

from mole.pipeline.dsl import DEFAULT_EXPERTS, build_pipeline, mole_pipeline

__all__ = ["DEFAULT_EXPERTS", "build_pipeline", "mole_pipeline"]
