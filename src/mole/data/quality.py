"""The small trainable binary quality classifier behind ``mole curate train-filter`` (paper §2).

The paper hand-labels ~300 good and ~300 bad crops and trains a VGG19 (batch 128, lr 1e-3, random flips,
200 epochs, best validation model) to drop blurry and "little person / all background" crops. mole trains
the same recipe on either a small CNN defined here (the default: no download, seconds on a CPU) or a
backbone the user supplies from a local file, and wraps the result as a filter (:class:`QualityFilter`,
``{"quality": {"checkpoint": "q.pt"}}``).

Backbone files (local paths only, loaded with ``weights_only=False``, so only use files you trust):

- a whole ``nn.Module`` saved with ``torch.save(model, path)`` (its class must be importable), or
- a TorchScript module saved with ``torch.jit.save(torch.jit.script(model), path)``.

Its output is flattened (4-D feature maps are global-average-pooled first) and a new linear head is put on
top; the whole network is trained unless ``freeze_backbone``. A plain state dict is refused: it does not
say which architecture to build.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mole.data.filters import FilterResult
from mole.data.ingest import Rejected, list_images, load_image
from mole.data.shards import sha256_file, to_rgb

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mole-quality-classifier"
CHECKPOINT_VERSION = 1
SMALL_CNN = "small_cnn"
BACKBONE = "backbone"
#: ImageNet statistics: what pretrained backbones expect, and harmless for the small CNN.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head: enough to learn sharpness or subject presence at 64-128 px.

    The first block runs at full resolution (blur lives in the finest pixels); global average pooling makes
    the network accept any input size, so ``image_size`` is a free choice. No BatchNorm: with a few hundred
    images and a handful of steps per epoch its running statistics lag the weights, and the
    evaluation-mode validation accuracy that picks the best epoch would be noise.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate((width, width * 2, width * 4, width * 8)):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)).squeeze(1)


class BackboneClassifier(nn.Module):
    """A user's backbone, its output pooled and flattened, and a new one-logit linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, 1)

    @staticmethod
    def features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = backbone(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.backbone, x)).squeeze(1)


def load_backbone(path: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    """A backbone module from a local file, and its format (``"torchscript"`` or ``"module"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            torchscript = any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        torchscript = False  # legacy (pre-1.6) torch.save format
    if torchscript:
        return torch.jit.load(str(path), map_location="cpu"), "torchscript"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot load backbone {path}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, nn.Module):
        raise ValueError(
            f"backbone {path} holds a {type(obj).__name__}, not a module: save the whole module with "
            "torch.save(model, path) or a TorchScript module with torch.jit.save(torch.jit.script(model), path)"
        )
    return obj, "module"


def _build_model(
    architecture: str, image_size: int, backbone: nn.Module | None = None, feature_dim: int | None = None
) -> nn.Module:
    if architecture == SMALL_CNN:
        return SmallCNN()
    assert backbone is not None
    if feature_dim is None:
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            feature_dim = BackboneClassifier.features(backbone, torch.zeros(2, 3, image_size, image_size)).shape[1]
        backbone.train(was_training)
    return BackboneClassifier(backbone, int(feature_dim))


def _to_tensor(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """Normalised ``[N, 3, S, S]`` float tensor (images squashed to squares: curation crops are square)."""
    arrays = [
        np.asarray(to_rgb(im).resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.float32)
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _load_folder(folder: Path, image_size: int, role: str) -> tuple[torch.Tensor, int]:
    """Every readable image under ``folder``; unreadable ones are skipped, counted and logged."""
    images, skipped = [], 0
    for path in list_images(folder):
        try:
            images.append(load_image(path, min_side=1))
        except Rejected as rej:
            skipped += 1
            logger.warning("%s: skipped (%s)", path, rej.reason)
    if len(images) < 2:
        raise ValueError(
            f"{role} folder {folder} has {len(images)} readable image(s) ({skipped} unreadable); need at least 2"
        )
    return _to_tensor(images, image_size), skipped


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[n_val:], order[:n_val]


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    accuracy = ((logits > 0).float() == y).float().mean().item()
    return loss, accuracy


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    from mole import atomic

    with atomic.replaced(path) as tmp:
        torch.save(obj, tmp)


def train_quality_classifier(
    positives_dir: str | os.PathLike[str],
    negatives_dir: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    backbone: str | os.PathLike[str] | None = None,
    epochs: int = 200,
    lr: float = 1e-3,
    batch_size: int = 128,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 64,
    freeze_backbone: bool = False,
    threshold: float = 0.5,
    device: str | None = None,
) -> dict[str, Any]:
    """Train a keep/reject classifier on two folders of examples and save the best-validation weights.

    Follows the paper's recipe (batch 128, lr 1e-3, random horizontal flips, 200 epochs, best validation
    model) with Adam. Each class is split into train and validation parts separately (``val_fraction`` of
    each, at least one image), so the validation set always holds both classes.

    Args:
        positives_dir: Images to keep (searched recursively).
        negatives_dir: Images to reject.
        output_path: Checkpoint to write (atomically; overwritten).
        backbone: A local backbone file (see the module docstring); None: the small CNN.
        image_size: Side the images are resized to. 64 keeps training fast; blur is better judged at 128+.
        freeze_backbone: Train only the new head on a (pretrained) backbone.
        threshold: Default P(good) below which :class:`QualityFilter` rejects, stored in the checkpoint.
        device: Torch device; default CUDA when available.

    Returns:
        JSON-serialisable metrics: the best epoch, its validation accuracy/loss, image counts, skips.

    Raises:
        FileNotFoundError: a folder or the backbone file is missing.
        ValueError: a folder has fewer than 2 readable images, or a setting is out of range.
    """
    if epochs < 1 or batch_size < 1 or image_size < 8 or lr <= 0:
        raise ValueError(
            "need epochs >= 1, batch_size >= 1, image_size >= 8 and lr > 0; "
            f"got {epochs}, {batch_size}, {image_size}, {lr}"
        )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    pos_x, pos_skipped = _load_folder(Path(positives_dir), image_size, "positives")
    neg_x, neg_skipped = _load_folder(Path(negatives_dir), image_size, "negatives")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pos_train, pos_val = _split(len(pos_x), val_fraction, generator)
    neg_train, neg_val = _split(len(neg_x), val_fraction, generator)
    x_train = torch.cat([pos_x[pos_train], neg_x[neg_train]])
    y_train = torch.cat([torch.ones(len(pos_train)), torch.zeros(len(neg_train))])
    x_val = torch.cat([pos_x[pos_val], neg_x[neg_val]])
    y_val = torch.cat([torch.ones(len(pos_val)), torch.zeros(len(neg_val))])

    backbone_info = None
    if backbone is not None:
        module, fmt = load_backbone(backbone)
        path = Path(backbone).resolve()
        backbone_info = {"path": str(path), "format": fmt, "sha256": sha256_file(path)}
        model = _build_model(BACKBONE, image_size, module)
        if freeze_backbone:
            module.requires_grad_(False)
    else:
        model = _build_model(SMALL_CNN, image_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    pos_weight = torch.tensor(len(neg_train) / len(pos_train), device=device)  # balances uneven folders

    best: tuple[float, float] = (-1.0, math.inf)  # (val accuracy, -val loss) ordering
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, train_loss = 0, math.nan
    for epoch in range(1, epochs + 1):
        model.train()
        if freeze_backbone and backbone is not None:
            model.backbone.eval()  # keep pretrained BatchNorm statistics
        order = torch.randperm(len(x_train), generator=generator).to(device)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = x_train[idx]
            flip = (torch.rand(len(idx), generator=generator) < 0.5).to(device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y_train[idx], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        train_loss = total / len(order)
        val_loss, val_acc = _evaluate(model, x_val, y_val, batch_size)
        logger.debug(
            "epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f", epoch, train_loss, val_loss, val_acc
        )
        if val_acc > best[0] or (val_acc == best[0] and val_loss < best[1]):
            best, best_epoch = (val_acc, val_loss), epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    model.load_state_dict(best_state)
    train_eval_loss, train_acc = _evaluate(model, x_train, y_train, batch_size)
    metrics = {
        "best_epoch": best_epoch,
        "val_accuracy": best[0],
        "val_loss": best[1],
        "train_accuracy": train_acc,
        "train_loss": train_eval_loss,
        "epochs": epochs,
        "positives": len(pos_x),
        "negatives": len(neg_x),
        "train_images": len(x_train),
        "val_images": len(x_val),
        "skipped_positives": pos_skipped,
        "skipped_negatives": neg_skipped,
    }
    _atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "architecture": BACKBONE if backbone is not None else SMALL_CNN,
            "backbone": backbone_info,
            "feature_dim": model.head.in_features if backbone is not None else None,
            "image_size": image_size,
            "threshold": threshold,
            "mean": list(MEAN),
            "std": list(STD),
            "state_dict": best_state,
            "metrics": metrics,
        },
        Path(output_path),
    )
    logger.info("quality classifier written to %s: val accuracy %.3f at epoch %d", output_path, best[0], best_epoch)
    return metrics


class QualityFilter:
    """A trained quality classifier as an :class:`~mole.data.filters.ImageFilter`; the score is P(good).

    Args:
        checkpoint: A file written by :func:`train_quality_classifier`. It is read with
            ``weights_only=True`` (tensors and plain values only), so a checkpoint cannot run code.
        min_prob: P(good) below which an image is rejected; default the threshold stored at training.
        backbone: Where the backbone file is now, if it moved since training (backbone checkpoints store
            the trained weights but need the backbone file for the architecture).
        device: Torch device; default CPU (curation workers are CPU processes).
    """

    name = "quality"

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        min_prob: float | None = None,
        backbone: str | os.PathLike[str] | None = None,
        device: str = "cpu",
    ) -> None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"quality classifier checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read quality classifier checkpoint {path}: {type(err).__name__}: {err}") from err
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a mole quality classifier checkpoint (written by train-filter)")
        self.image_size = int(ckpt["image_size"])
        if ckpt["architecture"] == SMALL_CNN:
            model = _build_model(SMALL_CNN, self.image_size)
        elif ckpt["architecture"] == BACKBONE:
            info = ckpt["backbone"]
            source = Path(backbone) if backbone is not None else Path(info["path"])
            if not source.is_file():
                raise FileNotFoundError(
                    f"{path} was trained on the backbone {info['path']}, which is missing; pass backbone= its new path"
                )
            if sha256_file(source) != info["sha256"]:
                logger.warning("%s: backbone %s differs from the one trained on (sha256)", path, source)
            module, _ = load_backbone(source)
            model = _build_model(BACKBONE, self.image_size, module, ckpt["feature_dim"])
        else:
            raise ValueError(f"{path}: unknown architecture {ckpt['architecture']!r}")
        model.load_state_dict(ckpt["state_dict"])
        self.model = model.to(device).eval()
        self.device = device
        self.min_prob = float(ckpt["threshold"] if min_prob is None else min_prob)
        if not 0 <= self.min_prob <= 1:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """P(good) for each image."""
        x = _to_tensor(images, self.image_size).to(self.device)
        return torch.sigmoid(self.model(x)).cpu().numpy().astype(np.float64)

    def __call__(self, image: Image.Image) -> FilterResult:
        prob = float(self.predict([image])[0])
        if prob < self.min_prob:
            return FilterResult(False, prob, f"low quality (p(good) {prob:.2f} < {self.min_prob:g})")
        return FilterResult(True, prob)
