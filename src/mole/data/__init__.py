"""Data: the sharded dataset format (``mole-shards/1``), synthetic human-centric data, and (later) curation."""

from __future__ import annotations

from mole.data.shards import (
    FORMAT,
    DatasetError,
    DatasetIndex,
    DatasetReader,
    Sample,
    ShardInfo,
    ShardWriter,
    dataset_digest,
    iter_samples,
    load_samples,
    read_index,
)
from mole.data.synthetic import KINDS, generate, write_dataset

__all__ = [
    "FORMAT",
    "KINDS",
    "DatasetError",
    "DatasetIndex",
    "DatasetReader",
    "Sample",
    "ShardInfo",
    "ShardWriter",
    "dataset_digest",
    "generate",
    "iter_samples",
    "load_samples",
    "read_index",
    "write_dataset",
]
