"""What every scorer shares: config lookups that name what is missing, checkpoint loading, the released
models' image preprocessing, devices, dtypes and batching."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

#: OpenAI CLIP's normalisation, also used by open_clip (HPS v2) and by ImageReward's BLIP.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def config_path(config: Mapping[str, Any], key: str, scorer: str, what: str, *, kind: str = "file") -> Path:
    """The path under ``config[key]``, which must exist.

    Args:
        config: The scorer's config.
        key: The config key.
        scorer: The scorer's name, for the messages.
        what: What the file is and where it comes from, for the messages.
        kind: ``"file"``, ``"dir"`` or ``"any"``.

    Raises:
        ValueError: If the key is absent (names it and what it should point to).
        FileNotFoundError: If the path does not exist (names it and what the scorer needs).
    """
    if config.get(key) in (None, ""):
        raise ValueError(f"scorer {scorer!r} needs config key {key!r}: the local path of {what}")
    path = Path(os.path.expanduser(os.fspath(config[key])))
    ok = {"file": path.is_file, "dir": path.is_dir, "any": path.exists}[kind]()
    if not ok:
        noun = {"file": "file", "dir": "folder", "any": "file or folder"}[kind]
        raise FileNotFoundError(f"scorer {scorer!r}: {noun} {path} not found (config {key!r}: {what})")
    return path


def require_files(folder: Path, names: Sequence[str | tuple[str, ...]], scorer: str, what: str) -> None:
    """Raise ``FileNotFoundError`` naming the first of ``names`` missing in ``folder``.

    A tuple in ``names`` means any one of its files will do (e.g. safetensors or a pickled state dict).
    """
    for name in names:
        options = (name,) if isinstance(name, str) else name
        if not any((folder / n).is_file() for n in options):
            wanted = " or ".join(str(folder / n) for n in options)
            raise FileNotFoundError(f"scorer {scorer!r}: {wanted} not found ({what})")


def resolve_device(device: str | torch.device | None, config: Mapping[str, Any]) -> torch.device:
    """``device`` if given, else ``config['device']``, else CUDA when available, else CPU."""
    chosen = device if device is not None else config.get("device")
    if chosen is None:
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(chosen)


def resolve_dtype(config: Mapping[str, Any], device: torch.device) -> torch.dtype:
    """``config['dtype']`` (``float32`` by default: the scores then do not depend on the GPU's half precision).

    Half precision is refused on CPU, where most kernels lack it.
    """
    name = str(config.get("dtype", "float32")).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {config.get('dtype')!r}; use one of {sorted(_DTYPES)}")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"dtype {name} needs a GPU; use float32 on CPU")
    return dtype


def resolve_batch_size(config: Mapping[str, Any], default: int = 16) -> int:
    batch_size = int(config.get("batch_size", default))
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def load_state_dict(path: Path, *, trust_pickle: bool = False, scorer: str = "") -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` state dict from a ``.safetensors`` file or a ``torch.save`` file.

    Released checkpoints wrap their weights in different ways: ``{"state_dict": ...}`` (HPS v1, HPS v2),
    ``{"model": ...}`` (BLIP) or nothing (ImageReward); a ``module.`` prefix is left by DistributedDataParallel.
    All are unwrapped here. Pickles are read with ``weights_only=True`` unless ``trust_pickle``, so a
    checkpoint cannot run code; a file that needs more fails with a message saying how to opt in.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as e:
            if trust_pickle:
                raise
            raise ValueError(
                f"scorer {scorer!r}: {path} holds more than tensors and plain values, so it was not unpickled "
                f"({type(e).__name__}: {e}). If you trust the file, set 'trust_pickle: true' in the scorer config."
            ) from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"scorer {scorer!r}: {path} holds no state dict (got {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        logger.info("%s: ignoring %d non-tensor entries: %s", path.name, len(others), others[:5])
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def empty_init() -> Any:
    """A context that skips random initialisation of a model whose every weight is about to be loaded.

    Saves most of the start-up time of the large towers (ViT-H-14 has 1B parameters); falls back to a no-op
    if the installed transformers lacks it.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - depends on the transformers version
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def clip_preprocess(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """The released scorers' torchvision transform, in PIL and numpy (torchvision is not importable here).

    ``Resize(size, BICUBIC)`` on the shorter side (the longer side truncated as torchvision does), then
    ``CenterCrop(size)`` with torchvision's rounding, then RGB, ``ToTensor()`` and ``Normalize(mean, std)``,
    in that order, as in OpenAI CLIP's ``_transform``, open_clip's validation transform and ImageReward's.

    Returns:
        A float32 ``[N, 3, size, size]`` tensor.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__}")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        top = round((new_h - size) / 2.0)  # torchvision: int(round(...)), half to even
        left = round((new_w - size) / 2.0)
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((pixels - mean_t) / std_t)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class BatchedScorer:
    """Base of the scorers: checks the inputs, splits them into batches, runs without gradients.

    Subclasses set ``name`` and implement :meth:`score_batch`.
    """

    name: str = ""

    def __init__(self, *, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One score per (image, prompt) pair, in order."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        with torch.inference_mode():
            for s in batch_slices(len(images), self.batch_size):
                batch = self.score_batch(list(images[s]), [str(p) for p in prompts[s]])
                scores.extend(float(x) for x in batch.float().cpu())
        bad = [i for i, x in enumerate(scores) if not math.isfinite(x)]
        if bad:
            logger.warning("%s: %d non-finite scores (first at index %d)", self.name, len(bad), bad[0])
        return scores

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores of one batch, shape ``[len(images)]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, batch_size={self.batch_size})"
