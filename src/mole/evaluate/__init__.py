"""Evaluation of the paper (§4.1): human-centric prompt benchmarks and human-preference scorers.

- :mod:`mole.evaluate.prompts` builds "COCO Human Prompts" and "DiffusionDB Human Prompts" from the real
  COCO captions JSON and DiffusionDB ``metadata.parquet`` files, and samples the 3k-prompt subsets.
- :mod:`mole.evaluate.scorers` scores image–prompt pairs with CLIP score, HPS v1, HPS v2 and ImageReward,
  loading weights only from local paths.
- :mod:`mole.evaluate.gates` records the gate statistics of figure 7.

Nothing heavy is imported here, so ``import mole.evaluate.prompts`` stays cheap.
"""
