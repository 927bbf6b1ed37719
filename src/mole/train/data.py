"""Training data: random access into mole-shards datasets, augmentation, and a resumable sampler.

The sampler is a pure function of (seed, position): the k-th sample the run consumes is fixed by the seed,
so resuming at optimizer step s continues at position s × batch × grad_accum × processes and sees exactly
the samples an uninterrupted run would have seen, with the same augmentation.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from mole.data.shards import DatasetError, read_index, verify_shard

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image bytes live, and its caption (captions are small, so kept in memory)."""

    key: str
    shard: str
    offset: int
    size: int
    caption: str


def index_samples(path: str | os.PathLike[str]) -> tuple[list[SampleRef], Counter[str]]:
    """Read every shard's tar headers once and return a random-access index.

    Samples without an image or caption are skipped and counted by reason (never a crash, never silent).
    Every shard is verified against ``dataset.json`` first (sha256 and sample count).

    Raises:
        DatasetError: Not a dataset, a shard that fails verification (named), or no usable sample at all.
    """
    root = Path(path)
    index = read_index(root)
    refs: list[SampleRef] = []
    rejected: Counter[str] = Counter()
    for shard in index.shards:
        shard_path = verify_shard(root, shard)
        parts: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, dot, suffix = member.name.partition(".")
                if dot:
                    parts.setdefault(key, {})["." + suffix.lower()] = member
            for key, members in parts.items():
                image = next((members[s] for s in _IMAGE_SUFFIXES if s in members), None)
                if image is None:
                    rejected["missing image"] += 1
                    continue
                if ".txt" not in members:
                    rejected["missing caption"] += 1
                    continue
                handle = tar.extractfile(members[".txt"])
                if handle is None:  # a directory or link named like a caption: not a caption file
                    rejected["caption not a file"] += 1
                    continue
                caption = handle.read().decode("utf-8", errors="replace").strip()
                if not caption:
                    rejected["empty caption"] += 1
                    continue
                refs.append(SampleRef(key, str(shard_path), image.offset_data, image.size, caption))
    if rejected:
        logger.warning("%s: %d samples skipped: %s", root, sum(rejected.values()), dict(rejected))
    if not refs:
        raise DatasetError(f"{root}: no usable image-caption sample (rejected: {dict(rejected) or 'none'})")
    return refs, rejected


def _sample_rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, position])


class ImageCaptionDataset(Dataset):
    """Map-style dataset of (pixels in [-1, 1], token ids), indexed by ``(sample index, position)``.

    ``path`` is one dataset, or several by name (``{"scenes": ..., "faces": ..., "hands": ...}``: the paper's
    human-centric dataset of stage 1), concatenated in that order; :class:`MixtureSampler` weighs them.

    The position seeds the sample's own augmentation and caption dropout, which makes them independent of
    worker processes and exactly reproducible on resume.

    ``with_pixels=False`` (training from cached latents) draws the very same flip and caption dropout for a
    position but never opens or decodes the image: ``__getitem__`` returns the index, the flip decision, the
    token ids and the dropout only. Random crops need the image's size to draw, so that mode needs
    ``center_crop``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
        tokenizer,
        resolution: int,
        *,
        center_crop: bool = True,
        random_flip: bool = True,
        caption_dropout: float = 0.0,
        seed: int = 0,
        with_pixels: bool = True,
    ) -> None:
        paths = dict(path) if isinstance(path, Mapping) else {"data": path}
        self.refs, self.rejected = [], Counter()
        self.sources: list[tuple[str, int, int]] = []
        """``(name, first index, count)`` of each source, in order: the mixture's sampler draws by source."""
        for name, source in paths.items():
            refs, rejected = index_samples(source)
            self.sources.append((name, len(self.refs), len(refs)))
            self.refs += refs
            self.rejected.update(rejected)
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.max_length = min(int(tokenizer.model_max_length), 77)
        self.with_pixels = with_pixels
        self.unusable: set[int] = set()
        """Indices whose image could not be decoded (found while building a latent cache): without pixels the
        dataset cannot discover them itself, so the next usable sample stands in for them, as with pixels."""

    def __len__(self) -> int:
        return len(self.refs)

    def load_image(self, i: int) -> Image.Image:
        ref = self.refs[i]
        with open(ref.shard, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except OSError as err:
            raise DatasetError(f"{ref.shard}: sample {ref.key} has an undecodable image ({err})") from err

    def crop(self, image: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """Resize the short side to the resolution and crop square: centred, or at a position drawn from ``rng``
        (the first draws of a sample's generator, before the flip's) when not ``center_crop``."""
        res = self.resolution
        w, h = image.size
        scale = res / min(w, h)
        image = image.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
        if self.center_crop:
            left, top = (w - res) // 2, (h - res) // 2
        else:
            if rng is None:
                raise ValueError("a random crop needs the sample's generator")
            left, top = int(rng.integers(0, w - res + 1)), int(rng.integers(0, h - res + 1))
        return image.crop((left, top, left + res, top + res))

    def draw_flip(self, rng: np.random.Generator) -> bool:
        """The sample's flip decision: one draw of its generator, taken only when ``random_flip`` is on."""
        return bool(self.random_flip and rng.random() < 0.5)

    @staticmethod
    def to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
        """A square RGB image, mirrored left-right if ``flip``, scaled to [-1, 1]: ``[3, H, W]``."""
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def transform(self, image: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        """Resize, crop square, maybe flip, scale to [-1, 1]: ``([3, H, W], flipped)``."""
        image = self.crop(image, rng)
        flip = self.draw_flip(rng)
        return self.to_tensor(image, flip), flip

    def tokenize(self, caption: str) -> torch.Tensor:
        ids = self.tokenizer(
            caption, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        return ids[0]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor | int | bool]:
        i, position = item
        rng = _sample_rng(self.seed, position)
        if self.with_pixels:
            i, image = self._decodable(i)
            pixels, flip = self.transform(image, rng)
        else:
            if not self.center_crop:
                raise DatasetError("without pixels the dataset cannot draw random crops (they need each image's size)")
            i = self._usable(i)
            pixels, flip = None, self.draw_flip(rng)  # the same draw, in the same order, as transform()'s
        dropped = bool(rng.random() < self.caption_dropout)
        caption = "" if dropped else self.refs[i].caption
        out: dict[str, torch.Tensor | int | bool] = {
            "input_ids": self.tokenize(caption), "index": i, "flip": flip, "dropped": dropped,
        }  # fmt: skip
        if pixels is not None:
            out["pixel_values"] = pixels
        return out

    def _decodable(self, i: int) -> tuple[int, Image.Image]:
        """Sample ``i``'s image, or the next decodable sample's (and its index) when it cannot be decoded."""
        for _ in range(len(self.refs)):
            try:
                return i, self.load_image(i)
            except DatasetError as err:
                # Counted and explained, then the next sample stands in: one bad file must not end a
                # week-long run. (The counter is per worker process; the warning is what reaches the log.)
                self.rejected["undecodable image"] += 1
                logger.warning("%s; using the next sample instead", err)
                i = (i + 1) % len(self.refs)
        raise DatasetError("no sample in the dataset can be decoded")

    def _usable(self, i: int) -> int:
        """``i``, or the next index not in :attr:`unusable` (the stand-in the pixel path would have found)."""
        for _ in range(len(self.refs)):
            if i not in self.unusable:
                return i
            i = (i + 1) % len(self.refs)
        raise DatasetError("no sample in the dataset can be decoded")


class ResumableSampler(Sampler[tuple[int, int]]):
    """Endless shuffled stream of ``(index, position)``, a pure function of the seed, split across processes.

    Global position p maps to epoch p // n and the p % n-th entry of that epoch's permutation. Process r of
    w takes positions r, r + w, r + 2w... starting from ``start``.
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n = num_samples
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        epoch, perm = -1, []
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                perm = self._permutation(epoch)
            yield perm[position % self.n], position
            position += self.world_size

    def __len__(self) -> int:  # endless; DataLoader needs a number only for its own bookkeeping
        return 2**62


class MixtureSampler(Sampler[tuple[int, int]]):
    """Endless stream over several sources with fixed sampling weights, a pure function of (seed, position).

    Positions are cut into blocks of ``block`` draws; each block holds exactly each source's share of the
    draws (largest remainder), in a seeded random order, so the weights hold exactly over every block rather
    than on average. The k-th draw of a source is the k-th entry of that source's own epoch-by-epoch
    permutation (as :class:`ResumableSampler`), so a source is never repeated within one of its epochs, a small
    source weighted up is cycled, and resuming at any position continues exactly. Yields ``(index, position)``
    with indices into the concatenation of the sources.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        block: int = 1000,
    ) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per source, got {len(weights)} for {len(sizes)}")
        if any(n < 1 for n in sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"sizes must be >= 1 and weights >= 0 with a positive sum, got {sizes}, {weights}")
        share = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * block
        counts = np.floor(share).astype(int)
        for i in np.argsort(-(share - counts), kind="stable")[: block - int(counts.sum())]:
            counts[i] += 1
        if any(w > 0 and c == 0 for w, c in zip(weights, counts, strict=True)):
            raise ValueError(f"a weight below 1/{block} of the total gets no draw: {list(weights)}")
        self.sizes, self.counts, self.block = list(sizes), counts.tolist(), block
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size
        self._block_cache: tuple[int, list[tuple[int, int]]] = (-1, [])
        self._perms: dict[int, tuple[int, list[int]]] = {}

    def _entries(self, b: int) -> list[tuple[int, int]]:
        """Block ``b``: ``(source, rank of this draw among the block's draws of that source)`` per slot."""
        if self._block_cache[0] != b:
            order = np.repeat(np.arange(len(self.counts)), self.counts)
            np.random.default_rng([self.seed, b, 17]).shuffle(order)
            seen = [0] * len(self.counts)
            entries = []
            for src in order.tolist():
                entries.append((src, seen[src]))
                seen[src] += 1
            self._block_cache = (b, entries)
        return self._block_cache[1]

    def _permutation(self, src: int, epoch: int) -> list[int]:
        if self._perms.get(src, (-1, []))[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 31 + src)
            self._perms[src] = (epoch, torch.randperm(self.sizes[src], generator=g).tolist())
        return self._perms[src][1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        while True:
            b, slot = divmod(position, self.block)
            src, r = self._entries(b)[slot]
            k = b * self.counts[src] + r  # this is the k-th draw of source src
            n = self.sizes[src]
            yield self.offsets[src] + self._permutation(src, k // n)[k % n], position
            position += self.world_size

    def __len__(self) -> int:
        return 2**62


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch; ``pixel_values`` only when the samples carry pixels."""
    batch = {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
        "flip": torch.tensor([s["flip"] for s in samples]),
        "dropped": torch.tensor([s["dropped"] for s in samples]),
    }
    if "pixel_values" in samples[0]:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    return batch
