"""Features computed once before training: the VAE's latent posteriors (``cache_latents``) and the frozen text
encoder's states (``cache_text``).

The latent cache does what the field does (kohya-ss, diffusers' scripts): every sample is encoded once in
each orientation it can be trained in — as is and, with ``random_flip``, mirrored (the mirrored PIXELS are
encoded: the VAE is not flip-equivariant, so a flipped latent is not the mirror's latent). At train time the
dataset draws each position's flip exactly as the pixel path does (``ImageCaptionDataset(with_pixels=False)``)
and the batch takes that orientation's posterior mean and std, from which a latent is sampled with fresh
noise, as ``vae.encode(...).latent_dist.sample()`` would: the same flips, the same caption dropouts, the same
posterior sampling as an uncached run. Random crops cannot be cached (every position would crop elsewhere):
curated data are square at the training resolution already, so ``center_crop`` loses nothing.

Held in memory (fp32, on the training device) when ``latent_cache_dir`` is unset; else on disk, memory-mapped:
``<dir>/<key>/{mean,std}.npy`` of shape ``[N, orientations, 4, res/8, res/8]`` in float16 plus ``usable.npy`` and
``meta.json``. Per sample and orientation that is 2 × 4 × (res/8)² × 2 bytes: 64 KiB at 512², so a million images
with flips take about 122 GiB (10⁶ × 128 KiB). The key is a sha256 over everything that decides the latents (the
data digest, the VAE's config and weights, the dtype it encodes in, resolution, crop, orientations, this format's
version): another run or a resumption with the same key reuses the folder, anything else builds a new one. A folder
is built as ``<key>.partial`` by every process (rank r encodes samples r, r + w, ...) and renamed into place after
``meta.json`` is written, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mole import atomic
from mole.data.shards import DatasetError
from mole.train.data import ImageCaptionDataset
from mole.train.stages import Stage, StageError

logger = logging.getLogger(__name__)

#: Version of the on-disk layout; part of the key, so a new layout never reads an old folder.
FORMAT_VERSION = 1
META = "meta.json"
_ARRAYS = ("mean.npy", "std.npy", "usable.npy")


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents scaled for the UNet, sampled from the posterior: ``[B, 3, H, W] -> [B, 4, H/8, W/8]`` (what
    a step without the cache trains on)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.sample() * vae.config.scaling_factor


def vae_fingerprint(vae: torch.nn.Module) -> dict[str, Any]:
    """The VAE's config, the sha256 of its weights and the dtype it encodes in: what makes its latents."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data)
    # Without diffusers' bookkeeping (``_name_or_path``: where it was loaded from; the library version): the
    # same VAE read from stage 1's output must give the key it had when read from the base model.
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    return {"config": config, "weights_sha256": digest.hexdigest(), "dtype": str(vae.dtype)}


def key_inputs(data_digest: str, vae: torch.nn.Module, dataset: ImageCaptionDataset) -> dict[str, Any]:
    """Everything that decides the cached latents (the key is their sha256)."""
    return {
        "format": FORMAT_VERSION,
        "data_digest": data_digest,
        "samples": len(dataset),
        "vae": vae_fingerprint(vae),
        "resolution": dataset.resolution,
        "center_crop": dataset.center_crop,
        "orientations": orientations(dataset),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def orientations(dataset: ImageCaptionDataset) -> int:
    """2 (as is, mirrored) with random flips, else 1."""
    return 2 if dataset.random_flip else 1


def latent_shape(vae: torch.nn.Module, resolution: int) -> tuple[int, int, int]:
    """``(channels, side, side)`` of one latent: SD's VAE halves the side once per block but the last."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.latent_channels), resolution // factor, resolution // factor


def cache_shape(vae: torch.nn.Module, dataset: ImageCaptionDataset) -> tuple[int, ...]:
    """``(samples, orientations, channels, side, side)``: the shape of the cached mean (and std)."""
    return (len(dataset), orientations(dataset), *latent_shape(vae, dataset.resolution))


class LatentCache:
    """Posterior mean and std of every sample in every orientation: ``[N, O, C, h, w]`` each.

    The arrays are torch tensors (in memory) or numpy memmaps (on disk); one lookup serves both: the rows a
    batch needs are gathered, then (memmaps) wrapped with ``torch.from_numpy`` and widened to fp32.
    """

    def __init__(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray, scaling: float) -> None:
        self.mean, self.std, self.scaling = mean, std, float(scaling)

    def moments(self, index: torch.Tensor, flip: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (fp32, on ``device``) for samples ``index`` in the orientations ``flip`` drew."""
        orient = flip.long() if self.mean.shape[1] == 2 else torch.zeros_like(index)
        return _rows(self.mean, index, orient, device), _rows(self.std, index, orient, device)

    def latents(self, index: torch.Tensor, flip: torch.Tensor, device) -> torch.Tensor:
        """A posterior sample scaled for the UNet, as ``encode_latents`` gives: ``[B, C, h, w]``. The noise is
        drawn like diffusers' ``latent_dist.sample()`` (``randn`` of the mean's shape, global generator)."""
        mean, std = self.moments(index, flip, device)
        return (mean + std * torch.randn_like(mean)) * self.scaling


def _rows(array: torch.Tensor | np.ndarray, index: torch.Tensor, orient: torch.Tensor, device) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        rows = torch.from_numpy(np.asarray(array[index.cpu().numpy(), orient.cpu().numpy()]))
    else:
        rows = array[index.to(array.device), orient.to(array.device)]
    return rows.to(device=device, dtype=torch.float32)


Writer = Callable[[list[int], torch.Tensor, torch.Tensor], None]
"""``write(rows, mean, std)``: store the moments ``[b, O, C, h, w]`` of samples ``rows``."""


@torch.no_grad()
def _encode_share(
    vae, dataset: ImageCaptionDataset, indices: list[int], batch_size: int, write: Writer, show: bool
) -> int:
    """Encode ``indices`` in every orientation and ``write`` their moments; returns how many images could not be
    decoded (counted in ``dataset.rejected`` and warned about; their rows stay unusable).

    Raises:
        StageError: The VAE gives latents of another shape than :func:`latent_shape` expects.
    """
    from tqdm.auto import tqdm

    n_orient = orientations(dataset)
    bad = 0
    for start in tqdm(range(0, len(indices), batch_size), disable=not show, desc="latent cache"):
        rows, pixels = [], []
        for i in indices[start : start + batch_size]:
            try:
                image = dataset.crop(dataset.load_image(i))
            except DatasetError as err:
                dataset.rejected["undecodable image"] += 1
                logger.warning("%s; the next usable sample stands in for it in training", err)
                bad += 1
                continue
            rows.append(i)
            pixels.append(dataset.to_tensor(image))
        if not rows:
            continue
        batch = torch.stack(pixels)  # [b, 3, H, W]; the mirrors encoded from mirrored pixels
        if n_orient == 2:
            batch = torch.cat([batch, torch.flip(batch, dims=[-1])])
        dist = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
        mean = dist.mean.unflatten(0, (n_orient, len(rows))).transpose(0, 1)  # [b, O, C, h, w]
        std = dist.std.unflatten(0, (n_orient, len(rows))).transpose(0, 1)
        if tuple(mean.shape[2:]) != latent_shape(vae, dataset.resolution):
            raise StageError(f"the VAE gives latents of shape {tuple(mean.shape[2:])} at {dataset.resolution}², "
                             f"the latent cache expects {latent_shape(vae, dataset.resolution)}")  # fmt: skip
        write(rows, mean, std)
    return bad


def build_in_memory(vae, dataset: ImageCaptionDataset, batch_size: int, device) -> LatentCache:
    """Every sample on this process, fp32 on ``device`` (what the cache was before it could live on disk)."""
    shape = cache_shape(vae, dataset)
    mean = torch.zeros(shape, device=device)
    std = torch.zeros(shape, device=device)

    encoded: list[int] = []

    def write(rows: list[int], m: torch.Tensor, s: torch.Tensor) -> None:
        mean[rows], std[rows] = m.float().to(device), s.float().to(device)
        encoded.extend(rows)

    _encode_share(vae, dataset, list(range(len(dataset))), batch_size, write, True)
    dataset.unusable = set(range(len(dataset))) - set(encoded)
    return LatentCache(mean, std, vae.config.scaling_factor)


def _all_ok(accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process (one all-reduce), so that all raise together, none hangs."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_folder(folder: Path, key: str, shape: tuple[int, ...]) -> str | None:
    """Why ``folder`` is not the complete cache of ``key`` with ``shape`` (None: it is)."""
    meta = _read_meta(folder)
    if meta is None:
        return f"no readable {META}"
    if meta.get("key") != key:
        return f"its {META} is for key {str(meta.get('key'))[:16]}"
    if tuple(meta.get("shape", ())) != shape or meta.get("dtype") != "float16":
        return f"its {META} says shape {meta.get('shape')} {meta.get('dtype')}, expected {list(shape)} float16"
    for name in _ARRAYS:
        try:
            array = np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError) as err:
            return f"{name} unreadable ({err})"
        want = shape[:1] if name == "usable.npy" else shape
        if array.shape != want:
            return f"{name} has shape {array.shape}, expected {want}"
    return None


def open_disk_cache(
    root: Path, inputs: dict[str, Any], vae, dataset: ImageCaptionDataset, accelerator, batch_size: int
) -> LatentCache:
    """Reuse the cache of ``inputs``' key under ``root``, or build it with every process's help.

    Raises:
        StageError: A process cannot see the folder rank 0 created (the folder must be shared by every
            process: one node, or a ReadWriteMany volume).
    """
    key = cache_key(inputs)
    final, partial = root / key, root / f"{key}.partial"
    shape = cache_shape(vae, dataset)
    rank, world = accelerator.process_index, accelerator.num_processes
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        why = _check_folder(final, key, shape) if final.exists() else None
        if final.exists() and why is None:
            logger.info("reusing latent cache %s", final)
        else:
            if why is not None:
                logger.warning("latent cache %s is not usable (%s): rebuilding it", final, why)
                shutil.rmtree(final)
            if partial.exists():
                logger.warning("latent cache %s was left unfinished by an earlier run: rebuilding it", partial)
                shutil.rmtree(partial)
            partial.mkdir()
            np.lib.format.open_memmap(partial / "mean.npy", mode="w+", dtype=np.float16, shape=shape).flush()
            np.lib.format.open_memmap(partial / "std.npy", mode="w+", dtype=np.float16, shape=shape).flush()
            np.lib.format.open_memmap(partial / "usable.npy", mode="w+", dtype=np.uint8, shape=shape[:1]).flush()
            logger.info("building latent cache %s: %d samples × %d orientation(s), %.2f GiB on disk", final,
                        shape[0], shape[1], 2 * np.prod(shape) * 2 / 2**30)  # fmt: skip
    accelerator.wait_for_everyone()
    reuse = (final / META).is_file()
    if not _all_ok(accelerator, reuse or partial.is_dir()):
        raise StageError(
            f"process {rank} cannot see the latent cache folder {partial} that process 0 created: "
            "latent_cache_dir must be one folder shared by every process (one node, or a ReadWriteMany volume)"
        )
    if not reuse:
        arrays = [np.load(partial / name, mmap_mode="r+") for name in _ARRAYS]
        mean, std, usable = arrays

        def write(rows: list[int], m: torch.Tensor, s: torch.Tensor) -> None:
            mean[rows] = m.to("cpu", torch.float16).numpy()
            std[rows] = s.to("cpu", torch.float16).numpy()
            usable[rows] = 1

        _encode_share(vae, dataset, list(range(rank, len(dataset), world)), batch_size, write, rank == 0)
        for array in arrays:
            array.flush()
        del arrays, mean, std, usable
        accelerator.wait_for_everyone()
        if rank == 0:
            count = int(np.load(partial / "usable.npy", mmap_mode="r").sum())
            meta = {"key": key, "inputs": inputs, "count": shape[0], "usable": count, "shape": list(shape),
                    "dtype": "float16", "arrays": list(_ARRAYS)}  # fmt: skip
            atomic.write_json(partial / META, meta)  # last: the folder is complete once it has its meta
            os.replace(partial, final)
        accelerator.wait_for_everyone()
    if not _all_ok(accelerator, (final / META).is_file()):
        raise StageError(f"process {rank} cannot see the latent cache {final}: latent_cache_dir must be shared "
                         "by every process (one node, or a ReadWriteMany volume)")  # fmt: skip
    usable = np.load(final / "usable.npy", mmap_mode="r")
    dataset.unusable = set(np.flatnonzero(usable == 0).tolist())
    if dataset.unusable:
        # Every process reports the same total (each counted only its own share while building, if it did).
        dataset.rejected["undecodable image"] = len(dataset.unusable)
        logger.warning("latent cache: %d undecodable image(s); the next usable sample stands in for each",
                       len(dataset.unusable))  # fmt: skip
    mean = np.load(final / "mean.npy", mmap_mode="r")
    std = np.load(final / "std.npy", mmap_mode="r")
    return LatentCache(mean, std, vae.config.scaling_factor)


def resolve_cache_dir(latent_cache_dir: str, output: Path) -> Path:
    """``latent_cache_dir`` as a folder: a relative one lives in the stage's output (resumption reuses it)."""
    path = Path(latent_cache_dir).expanduser()
    return path if path.is_absolute() else output / path


class FeatureCache:
    """The cached latents (:class:`LatentCache`) and text states of a run, and the UNet inputs of a batch."""

    def __init__(self, stage: Stage, dataset: ImageCaptionDataset, latents: LatentCache | None, text: bool, device):
        self.latents = latents
        self.text = self.empty_text = None
        if text:
            with torch.no_grad():
                states = []
                for ref in dataset.refs:
                    ids = dataset.tokenize(ref.caption)[None].to(device)
                    states.append(stage.model.text_encoder(ids)[0][0])
                self.text = torch.stack(states)
                self.empty_text = stage.model.text_encoder(dataset.tokenize("")[None].to(device))[0][0]

    def inputs(self, batch: dict[str, torch.Tensor], stage: Stage, device) -> dict[str, torch.Tensor]:
        index = batch["index"].to(device)
        out: dict[str, torch.Tensor] = {}
        if self.latents is not None:
            out["latents"] = self.latents.latents(index, batch["flip"], device)
        else:
            out["latents"] = encode_latents(stage.vae, batch["pixel_values"])
        if self.text is not None:
            dropped = batch["dropped"].to(device)[:, None, None]
            out["encoder_hidden_states"] = torch.where(dropped, self.empty_text[None], self.text[index])
        else:
            out["input_ids"] = batch["input_ids"].to(device)
        return out
