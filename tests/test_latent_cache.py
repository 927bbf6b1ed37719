"""The latent cache (issue 15): random flips kept exactly, no image decoded while training from it, and a disk
cache that is keyed, reused, rebuilt and shared by every process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.shard_helpers import hand_built

from mole.data.shards import DatasetError
from mole.train import ConfigError, load_config
from mole.train.config import parse_overrides, stage_config
from mole.train.data import ImageCaptionDataset, collate
from mole.train.latent_cache import (
    build_in_memory,
    cache_key,
    key_inputs,
    open_disk_cache,
)
from mole.train.loop import _data_digest, run_training
from mole.train.stages import StageError, build_stage

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mole.data.synthetic import write_dataset

    path = tmp_path_factory.mktemp("cache-data") / "faces"
    write_dataset(path, "faces", 6, seed=1, size=64)
    return path


@pytest.fixture(scope="module")
def with_bad_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five good samples and, third, one whose image bytes are no image: a valid shard and index, written by
    hand as another tool following docs/data-format.md would."""
    import io

    from mole.data.synthetic import generate

    members = []
    for k, (image, caption, _) in enumerate(generate("faces", 5, seed=2, size=64)):
        if k == 2:
            members += [("bad.png", b"\x89PNG\r\n\x1a\n garbage"), ("bad.txt", b"a face that cannot be decoded")]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        members += [(f"{k:09d}.png", buf.getvalue()), (f"{k:09d}.txt", caption.encode())]
    return hand_built(tmp_path_factory.mktemp("cache-bad") / "faces", members, num_samples=6, name="bad")


@pytest.fixture(scope="module")
def vae(tiny_model_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")


def _dataset(path: Path, tokenizer, *, with_pixels: bool, resolution: int = 64, flip: bool = True):
    return ImageCaptionDataset(path, tokenizer, resolution, random_flip=flip, caption_dropout=0.3, seed=7,
                               with_pixels=with_pixels)  # fmt: skip


class _OneProcess:
    """The accelerator surface the disk cache uses, for one process (or pretending to be another rank)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def _count_encodes(vae, monkeypatch) -> list[int]:
    calls: list[int] = []
    encode = vae.encode

    def counting(pixels, *args, **kwargs):
        calls.append(len(pixels))
        return encode(pixels, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return calls


# --- (a) flips: the cached path draws exactly the pixel path's -----------------------------------------------


def test_cached_latents_follow_the_pixel_paths_flips_and_dropouts(faces, tokenizer, vae) -> None:
    pixels = _dataset(faces, tokenizer, with_pixels=True)
    cached = _dataset(faces, tokenizer, with_pixels=False)
    cache = build_in_memory(vae, cached, batch_size=4, device="cpu")
    assert cache.mean.shape == (6, 2, 4, 8, 8)  # [N, orientations, C, h, w]
    flips = []
    for position in range(24):
        item = (position % 6, position)
        a, b = pixels[item], cached[item]
        assert "pixel_values" not in b
        assert (a["index"], a["flip"], a["dropped"]) == (b["index"], b["flip"], b["dropped"])
        assert torch.equal(a["input_ids"], b["input_ids"])
        flips.append(b["flip"])
        # The cached moments are the VAE's on the pixels the pixel path trains on, mirrored ones included.
        dist = vae.encode(a["pixel_values"][None]).latent_dist
        mean, std = cache.moments(torch.tensor([b["index"]]), torch.tensor([b["flip"]]), "cpu")
        torch.testing.assert_close(mean, dist.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(std, dist.std, atol=1e-5, rtol=1e-4)
    assert any(flips) and not all(flips)
    # The mirror was encoded from mirrored pixels: the VAE is not flip-equivariant, so it is not the mirrored latent.
    assert not torch.allclose(cache.mean[:, 1], torch.flip(cache.mean[:, 0], dims=[-1]), atol=1e-3)


# --- (b) a cached run trains exactly as an uncached one ---------------------------------------------------


def _stage1(tiny_model_dir: Path, sets: list[str]):
    cfg = load_config(TINY, parse_overrides(["stage1.validation_prompts=[]", *sets]))
    section = stage_config(cfg, "stage1", None)
    section = section.model_copy(update={"max_steps": 3, "batch_size": 2, "log_every": 1, "random_flip": True,
                                         "caption_dropout": 0.3, "seed": 4})  # fmt: skip
    return section, build_stage("stage1", section, cfg.model, tiny_model_dir)


def _losses(output: Path) -> list[float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_cached_run_with_flips_has_the_uncached_runs_losses(tiny_model_dir, faces, tmp_path, monkeypatch) -> None:
    section, spec = _stage1(tiny_model_dir, [])
    run_training(spec, section, str(faces), tmp_path / "pixels", resolution=64)
    section, spec = _stage1(tiny_model_dir, ["stage1.cache_latents=true"])
    loads = []
    load_image = ImageCaptionDataset.load_image
    monkeypatch.setattr(ImageCaptionDataset, "load_image", lambda self, i: loads.append(i) or load_image(self, i))
    run_training(spec, section, str(faces), tmp_path / "cached", resolution=64)
    expected, got = _losses(tmp_path / "pixels"), _losses(tmp_path / "cached")
    assert len(got) == 3
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert sorted(loads) == list(range(6))  # each image decoded once, to build the cache; never in training


# --- (c) the disk cache ---------------------------------------------------------------------------------


def test_disk_cache_is_built_once_reused_and_rebuilt_when_its_key_changes(
    faces, tokenizer, vae, tmp_path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="mole.train.latent_cache")
    calls = _count_encodes(vae, monkeypatch)
    root = tmp_path / "cache"
    digest = _data_digest(str(faces))
    ds = _dataset(faces, tokenizer, with_pixels=False)
    inputs = key_inputs(digest, vae, ds)
    disk = open_disk_cache(root, inputs, vae, ds, _OneProcess(), batch_size=4)
    folder = root / cache_key(inputs)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shape"] == [6, 2, 4, 8, 8] and meta["dtype"] == "float16" and meta["usable"] == 6
    assert isinstance(disk.mean, np.memmap) and disk.mean.dtype == np.float16 and disk.std.dtype == np.float16
    assert sum(calls) == 12  # 6 samples × 2 orientations
    memory = build_in_memory(vae, ds, batch_size=4, device="cpu")
    index, flip = torch.tensor([0, 3, 5, 3]), torch.tensor([True, False, True, True])
    for got, want in zip(disk.moments(index, flip, "cpu"), memory.moments(index, flip, "cpu"), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16 on disk

    calls.clear()
    again = open_disk_cache(root, key_inputs(digest, vae, ds), vae, ds, _OneProcess(), batch_size=4)
    assert calls == [] and "reusing latent cache" in caplog.text
    assert torch.equal(again.moments(index, flip, "cpu")[0], disk.moments(index, flip, "cpu")[0])

    # Another resolution, or no flips, is another key: a new folder beside the first.
    for other in (_dataset(faces, tokenizer, with_pixels=False, resolution=32),
                  _dataset(faces, tokenizer, with_pixels=False, flip=False)):  # fmt: skip
        calls.clear()
        other_inputs = key_inputs(digest, vae, other)
        assert cache_key(other_inputs) != cache_key(inputs)
        open_disk_cache(root, other_inputs, vae, other, _OneProcess(), batch_size=4)
        assert sum(calls) == 6 * (2 if other.random_flip else 1)
    assert len([p for p in root.iterdir() if p.is_dir()]) == 3
    # Other data (or other VAE weights): another key.
    assert cache_key({**inputs, "data_digest": "0" * 64}) != cache_key(inputs)
    with torch.no_grad():
        changed = key_inputs(digest, _perturbed(vae), ds)
    assert changed["vae"]["weights_sha256"] != inputs["vae"]["weights_sha256"]
    # The same VAE read from another folder (stage 1's output holds the base's VAE) keeps the key: the gates
    # reuse stage 1's cache.
    from diffusers import AutoencoderKL

    vae.save_pretrained(tmp_path / "copy")
    copy = AutoencoderKL.from_pretrained(tmp_path / "copy")
    assert cache_key(key_inputs(digest, copy, ds)) == cache_key(inputs)


def _perturbed(vae):
    import copy

    other = copy.deepcopy(vae)
    next(other.parameters()).add_(1e-3)
    return other


def test_a_relative_cache_dir_lives_in_the_output_and_a_resumption_reuses_it(
    tiny_model_dir, faces, tmp_path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="mole.train.latent_cache")
    sets = ["stage1.cache_latents=true", "stage1.latent_cache_dir=latent-cache", "stage1.checkpoint_every=1"]
    section, spec = _stage1(tiny_model_dir, sets)
    calls = _count_encodes(spec.vae, monkeypatch)
    first = run_training(spec, section, str(faces), tmp_path / "out", resolution=64)
    assert sum(calls) == 12 and first.steps == 3
    (folder,) = (tmp_path / "out" / "latent-cache").iterdir()
    assert json.loads((folder / "meta.json").read_text())["shape"] == [6, 2, 4, 8, 8]
    section, spec = _stage1(tiny_model_dir, sets)
    calls = _count_encodes(spec.vae, monkeypatch)
    section = section.model_copy(update={"max_steps": 5})
    resumed = run_training(spec, section, str(faces), tmp_path / "out", resolution=64, resume="latest")
    assert resumed.start_step == 3 and resumed.steps == 5
    assert calls == [] and f"reusing latent cache {folder}" in caplog.text


def test_leftover_partial_and_damaged_cache_folders_are_rebuilt(
    faces, tokenizer, vae, tmp_path, monkeypatch, caplog
) -> None:
    calls = _count_encodes(vae, monkeypatch)
    ds = _dataset(faces, tokenizer, with_pixels=False)
    inputs = key_inputs(_data_digest(str(faces)), vae, ds)
    root = tmp_path / "cache"
    final, partial = root / cache_key(inputs), root / f"{cache_key(inputs)}.partial"
    partial.mkdir(parents=True)
    (partial / "mean.npy").write_bytes(b"half a file")  # what a killed build leaves
    open_disk_cache(root, inputs, vae, ds, _OneProcess(), batch_size=4)
    assert "left unfinished" in caplog.text and sum(calls) == 12
    assert final.is_dir() and not partial.exists()
    # A folder whose meta does not match (another key, a hand edit) is not trusted: rebuilt, with a warning.
    meta = json.loads((final / "meta.json").read_text())
    (final / "meta.json").write_text(json.dumps({**meta, "shape": [6, 2, 4, 4, 4]}))
    calls.clear()
    cache = open_disk_cache(root, inputs, vae, ds, _OneProcess(), batch_size=4)
    assert "not usable" in caplog.text and sum(calls) == 12
    assert json.loads((final / "meta.json").read_text())["shape"] == [6, 2, 4, 8, 8]
    assert cache.mean.shape == (6, 2, 4, 8, 8)


def test_a_process_that_cannot_see_the_cache_folder_fails_clearly(faces, tokenizer, vae, tmp_path) -> None:
    ds = _dataset(faces, tokenizer, with_pixels=False)
    inputs = key_inputs(_data_digest(str(faces)), vae, ds)
    # Rank 1 of 2 on another node: rank 0 created the folder on its own disk, this one sees nothing.
    with pytest.raises(StageError, match="shared by every process"):
        open_disk_cache(tmp_path / "not-shared", inputs, vae, ds, _OneProcess(rank=1, world=2), batch_size=4)


class _Rank(_OneProcess):
    """One of several ranks run as threads: real barriers and a real sum-reduce between them."""

    def __init__(self, rank: int, world: int, barrier, flags: list) -> None:
        super().__init__(rank, world)
        self.barrier, self.flags = barrier, flags

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        self.flags[self.process_index] = tensor.clone()
        self.barrier.wait(timeout=60)
        total = torch.stack(self.flags).sum(0)
        self.barrier.wait(timeout=60)
        return total


def test_each_rank_encodes_its_share_into_the_one_cache(faces, tokenizer, vae, tmp_path) -> None:
    import threading

    world, barrier, flags = 2, threading.Barrier(2), [None, None]
    root = tmp_path / "cache"
    datasets = [_dataset(faces, tokenizer, with_pixels=False) for _ in range(world)]
    inputs = key_inputs(_data_digest(str(faces)), vae, datasets[0])
    decoded: list[list[int]] = [[], []]
    caches: list = [None, None]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        ds = datasets[r]
        load_image = ds.load_image
        ds.load_image = lambda i: decoded[r].append(i) or load_image(i)
        try:
            caches[r] = open_disk_cache(root, inputs, vae, ds, _Rank(r, world, barrier, flags), batch_size=2)
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert decoded == [[0, 2, 4], [1, 3, 5]]  # rank r encodes samples r, r + w, ...
    meta = json.loads((root / cache_key(inputs) / "meta.json").read_text())
    assert meta["usable"] == 6 and not (root / f"{cache_key(inputs)}.partial").exists()
    memory = build_in_memory(vae, datasets[0], batch_size=4, device="cpu")
    index, flip = torch.arange(6), torch.tensor([True, False] * 3)
    for cache in caches:
        torch.testing.assert_close(cache.moments(index, flip, "cpu")[0], memory.moments(index, flip, "cpu")[0],
                                   atol=2e-3, rtol=2e-3)  # fmt: skip


# --- (d) no pixels: nothing decoded; an undecodable image counted and replaced ------------------------------


def test_the_no_pixels_mode_never_decodes_an_image(faces, tokenizer, monkeypatch) -> None:
    def refuse(self, i):
        raise AssertionError(f"image {i} was decoded")

    monkeypatch.setattr(ImageCaptionDataset, "load_image", refuse)
    ds = _dataset(faces, tokenizer, with_pixels=False)
    batch = collate([ds[(i, i)] for i in range(6)])
    assert set(batch) == {"input_ids", "index", "flip", "dropped"}
    with pytest.raises(DatasetError, match="random crops"):
        ImageCaptionDataset(faces, tokenizer, 64, center_crop=False, with_pixels=False)[(0, 0)]


@pytest.mark.parametrize("on_disk", [False, True])
def test_an_undecodable_image_is_counted_and_the_next_sample_stands_in(
    with_bad_image, tokenizer, vae, tmp_path, on_disk, caplog
) -> None:
    pixels = _dataset(with_bad_image, tokenizer, with_pixels=True)
    cached = _dataset(with_bad_image, tokenizer, with_pixels=False)
    bad = next(i for i, ref in enumerate(cached.refs) if ref.key == "bad")
    if on_disk:
        inputs = key_inputs(_data_digest(str(with_bad_image)), vae, cached)
        cache = open_disk_cache(tmp_path, inputs, vae, cached, _OneProcess(), batch_size=2)
        assert json.loads((tmp_path / cache_key(inputs) / "meta.json").read_text())["usable"] == 5
    else:
        cache = build_in_memory(vae, cached, batch_size=2, device="cpu")
    assert cached.rejected["undecodable image"] == 1 and "undecodable image" in caplog.text
    assert cached.unusable == {bad}
    # At train time: the same stand-in as the pixel path's, with the same flip and dropout draws.
    a, b = pixels[(bad, 11)], cached[(bad, 11)]
    assert a["index"] == b["index"] == bad + 1 and (a["flip"], a["dropped"]) == (b["flip"], b["dropped"])
    mean, _ = cache.moments(torch.tensor([b["index"]]), torch.tensor([b["flip"]]), "cpu")
    assert mean.abs().sum() > 0  # a real latent, not the bad sample's empty row


# --- settings -------------------------------------------------------------------------------------------


def test_random_crops_are_refused_and_the_cache_dir_must_be_local(tiny_model_dir, faces, tmp_path) -> None:
    section, spec = _stage1(tiny_model_dir, ["stage1.cache_latents=true", "stage1.center_crop=false"])
    with pytest.raises(StageError, match=r"center_crop: true.*random crop.*square"):
        run_training(spec, section, str(faces), tmp_path, resolution=64)
    with pytest.raises(ConfigError, match="latent_cache_dir"):
        load_config(TINY, parse_overrides(["stage1.latent_cache_dir=s3://bucket/cache"]))


def test_paper_recipe_caches_latents_with_flips_in_one_shared_folder() -> None:
    cfg = load_config(REPO / "configs" / "paper.yaml")
    for section in (cfg.stage1, cfg.gates, *cfg.experts.values()):
        assert section.cache_latents and section.random_flip and section.center_crop
        assert section.latent_cache_dir == "../latent-cache"  # beside the outputs: the gates reuse stage 1's
