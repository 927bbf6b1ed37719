"""The on-disk dataset format ``mole-shards/1``: what curation and ``mole tiny data`` write and training reads.

```
DATASET_DIR/
  dataset.json        {"format": "mole-shards/1", "name", "kind", "num_samples",
                       "shards": [{"path", "num_samples", "sha256"}], "digest", "created_by", "meta"}
  shard-000000.tar    WebDataset layout: <key>.png|.jpg|.webp (image), <key>.txt (caption, UTF-8),
  shard-000001.tar    <key>.json (per-sample metadata: width, height, scores, source...)
```

Shards and the index are written atomically (temporary name, then rename), and ``dataset.json`` is written
last: a folder without it is not a dataset, so a crashed writer never leaves something that looks complete.
``digest`` (sha256 over the shards' sha256s) identifies the content for lineage. Shards are plain
(uncompressed) tars so that training can seek straight to a member's bytes. See docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from mole import atomic

logger = logging.getLogger(__name__)

FORMAT = "mole-shards/1"
INDEX_FILE = "dataset.json"
_IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# What PIL raises on a broken file besides OSError (UnidentifiedImageError is one): bad PNG chunks raise
# SyntaxError, some truncated streams ValueError or EOFError, huge images DecompressionBombError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset folder is missing, malformed, empty, or fails verification."""


@dataclass
class Sample:
    """One image–caption pair with its per-sample metadata (``width``, ``height``, and anything else)."""

    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardInfo:
    """One entry of the index's ``shards`` list; ``path`` is relative to the dataset folder."""

    path: str
    num_samples: int
    sha256: str


@dataclass
class DatasetIndex:
    """The contents of ``dataset.json``."""

    name: str
    kind: str
    num_samples: int
    shards: list[ShardInfo]
    digest: str
    created_by: str = "mole"
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(root: Path, shard: ShardInfo) -> Path:
    """Check one shard against its index entry before anything reads it: its sha256 (one streaming pass) and
    that it is a tar holding exactly ``shard.num_samples`` sample keys. Returns its path.

    Training reads shards by tar offsets; a truncated or replaced shard would otherwise train on whatever part of
    it still parses, and exit 0.

    Raises:
        DatasetError: Naming the shard: its bytes are not what the index says, it is not a tar, or it holds another
            number of samples.
    """
    path = root / shard.path
    if sha256_file(path) != shard.sha256:
        raise DatasetError(
            f"shard {shard.path} of {root}: sha256 does not match {INDEX_FILE} (truncated, corrupted or replaced); "
            "copy the dataset again or re-create it"
        )
    try:
        with tarfile.open(path, "r:") as tar:
            keys = {m.name.partition(".")[0] for m in tar if m.isfile() and "." in m.name}
    except (tarfile.TarError, OSError) as err:
        raise DatasetError(f"shard {shard.path} of {root} is not a readable tar: {err}") from err
    if len(keys) != shard.num_samples:
        raise DatasetError(
            f"shard {shard.path} of {root} holds {len(keys)} samples, {INDEX_FILE} says {shard.num_samples}"
        )
    return path


def compute_digest(shard_sha256s: list[str]) -> str:
    """The dataset digest: sha256 (hex) of the shards' sha256 hex strings concatenated in index order."""
    return hashlib.sha256("".join(shard_sha256s).encode("ascii")).hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode, so every reader gets the same kind of pixels.

    Transparency is composited on white (a transparent background read as black would teach the model
    black backgrounds), 16-bit grey is scaled to 8 bits rather than clipped, CMYK/L/P are converted.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        # I;16 is 16-bit by definition; mode I is also what older Pillow gives for 16-bit PNGs, but it can
        # hold 8-bit values too, so only scale it when the values need it.
        scale = 257.0 if image.mode != "I" or array.max() > 255 else 1.0
        grey = (array / scale).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


class ShardWriter:
    """Write a dataset: ``with ShardWriter(out, name=..., kind=...) as w: w.write(image, caption, meta)``.

    On a clean exit the last shard is closed and ``dataset.json`` written (``.index`` then holds it); on an
    exception the shards written so far are removed and no ``dataset.json`` is left, so a half-written
    dataset never looks complete.

    Args:
        out_dir: Dataset folder (created if needed).
        name: Human-readable dataset name for the index.
        kind: What the samples show (``faces``, ``hands``, ``scenes``...), for the index.
        samples_per_shard: Samples per tar; the last shard may hold fewer.
        image_format: ``png`` (lossless; the default), ``jpg`` or ``webp``.
        created_by: Recorded in the index (tool and version, say).
        meta: Free-form dataset metadata for the index (generator parameters, rejection counts...).
        overwrite: Replace a dataset already in ``out_dir`` (its index and shards are removed first).

    Raises:
        FileExistsError: ``out_dir`` already holds a dataset, or leftover shards of a crashed write, and
            ``overwrite`` is false.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        name: str,
        kind: str,
        samples_per_shard: int = 1000,
        image_format: str = "png",
        created_by: str = "mole",
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, not {samples_per_shard}")
        image_format = "jpg" if image_format == "jpeg" else image_format
        if image_format not in _PIL_FORMATS:
            raise ValueError(f"image_format must be png, jpg or webp, not {image_format!r}")
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"{self.out} exists and is not a folder")
        index_path = self.out / INDEX_FILE
        old = sorted(self.out.glob("shard-*.tar*")) if self.out.is_dir() else []
        if index_path.exists() or old:
            if not overwrite:
                what = INDEX_FILE if index_path.exists() else f"leftover shards ({old[0].name}...)"
                raise FileExistsError(
                    f"{self.out} already holds a dataset ({what}); pass overwrite=True (--overwrite) to replace it"
                )
            index_path.unlink(missing_ok=True)  # first, so the folder stops looking like a dataset at once
            for path in old:
                path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.name, self.kind, self.created_by = name, kind, created_by
        self.meta = dict(meta or {})
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.shards: list[ShardInfo] = []
        self.index: DatasetIndex | None = None
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._in_shard = 0
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __len__(self) -> int:
        """Samples written so far."""
        return len(self._keys)

    def _add(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible shards: the same samples give the same bytes and digest
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        if self._tmp is None or self._final is None:
            raise RuntimeError("a shard is open without its file names")
        final = self._final
        os.replace(self._tmp, final)  # the shard appears under its name only once complete
        self.shards.append(ShardInfo(final.name, self._in_shard, sha256_file(final)))
        self._tar, self._tmp, self._final, self._in_shard = None, None, None, 0

    def write(
        self, image: Image.Image, caption: str, meta: dict[str, Any] | None = None, key: str | None = None
    ) -> str:
        """Add one sample and return its key.

        Args:
            image: Any PIL image; stored as 8-bit RGB (see :func:`to_rgb`), upright per its EXIF orientation
                (re-encoding drops EXIF, so the rotation must be applied now or be lost).
            caption: Non-empty text; surrounding whitespace is stripped.
            meta: JSON-serialisable per-sample metadata; ``width`` and ``height`` are added.
            key: Unique key without ``.``, ``/`` or ``\\``; ``None`` numbers samples (``%09d`` of the
                sample's position).

        Raises:
            ValueError: Empty caption, bad or duplicate key, or a closed writer.
        """
        if self._closed:
            raise ValueError(f"ShardWriter for {self.out} is closed")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"sample {key or len(self._keys)}: caption must be a non-empty string, got {caption!r}")
        key = f"{len(self._keys):09d}" if key is None else key
        if not isinstance(key, str) or not key.strip() or any(c in key for c in "./\\"):
            raise ValueError(f"invalid sample key {key!r}: keys are non-empty and contain no '.', '/' or '\\'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        rgb = to_rgb(ImageOps.exif_transpose(image) or image)
        buf = io.BytesIO()
        extra = {"quality": 95} if self.image_format in ("jpg", "webp") else {}
        rgb.save(buf, format=_PIL_FORMATS[self.image_format], **extra)
        sample_meta = {**(meta or {}), "width": rgb.width, "height": rgb.height}
        meta_bytes = json.dumps(sample_meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        if self._tar is None:
            self._final = self.out / f"shard-{len(self.shards):06d}.tar"
            self._tmp = atomic.temp_path(self._final)
            # PAX only adds extended headers for long or non-ASCII names; short ASCII keys are plain ustar.
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed per shard)
        self._add(f"{key}.{self.image_format}", buf.getvalue())
        self._add(f"{key}.txt", caption.strip().encode("utf-8"))
        self._add(f"{key}.json", meta_bytes)
        self._keys.add(key)
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._close_shard()
        return key

    def close(self) -> DatasetIndex:
        """Close the last shard and write ``dataset.json`` (atomically); returns the index.

        An empty dataset is written too (curation that rejected everything records why in ``meta``), but
        readers refuse it with a clear error.
        """
        if self._closed:
            assert self.index is not None
            return self.index
        if not self._keys:
            logger.warning("%s: no samples were written; the dataset is empty", self.out)
        self._close_shard()
        index = DatasetIndex(
            name=self.name,
            kind=self.kind,
            num_samples=len(self._keys),
            shards=self.shards,
            digest=compute_digest([s.sha256 for s in self.shards]),
            created_by=self.created_by,
            meta=self.meta,
        )
        fields = asdict(index)
        ordered = {"format": fields.pop("format"), **fields}  # the format first, for whoever opens the file
        atomic.write_json(self.out / INDEX_FILE, ordered, ensure_ascii=False)
        self._closed = True
        self.index = index
        logger.debug("%s: %d samples in %d shard(s)", self.out, index.num_samples, len(index.shards))
        return index

    def abort(self) -> None:
        """Discard everything this writer wrote (the open shard and the finished ones)."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for shard in self.shards:
            (self.out / shard.path).unlink(missing_ok=True)
        self._tar, self._tmp, self.shards, self._closed = None, None, [], True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_index(path: str | os.PathLike[str]) -> DatasetIndex:
    """Read and check ``dataset.json``.

    Raises:
        DatasetError: Missing folder or index, malformed JSON, unknown format, no samples, missing shard.
    """
    root = Path(path)
    index_path = root / INDEX_FILE
    hint = "create one with `mole tiny data` or `mole curate`"
    if not root.is_dir():
        raise DatasetError(f"not a mole dataset: {root} does not exist or is not a folder; {hint}")
    if not index_path.is_file():
        raise DatasetError(f"not a mole dataset: {root} has no {INDEX_FILE} (missing index); {hint}")
    try:
        raw = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{index_path} is malformed (not valid JSON: {err})") from err
    if not isinstance(raw, dict):
        raise DatasetError(f"{index_path} is malformed: it must hold a JSON object, not {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise DatasetError(f"{index_path}: format {raw.get('format')!r} is not {FORMAT!r}")
    try:
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        index = DatasetIndex(shards=shards, **raw)
    except (TypeError, KeyError) as err:
        raise DatasetError(f"{index_path} is malformed: {err}") from err
    counts = [index.num_samples, *(s.num_samples for s in shards)]
    if not all(isinstance(n, int) and n >= 0 for n in counts):
        raise DatasetError(f"{index_path} is malformed: num_samples must be non-negative integers")
    if index.num_samples == 0 or not shards:
        raise DatasetError(f"dataset {root} is empty (num_samples={index.num_samples}, {len(shards)} shards)")
    if sum(counts[1:]) != index.num_samples:
        raise DatasetError(f"{index_path} is malformed: num_samples does not equal the sum over its shards")
    if index.digest != compute_digest([s.sha256 for s in shards]):
        raise DatasetError(f"{index_path} is malformed: digest does not match the shards' sha256 values")
    for shard in shards:
        rel = Path(shard.path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise DatasetError(f"{index_path}: shard path {shard.path!r} must be relative, inside the dataset folder")
        if not (root / shard.path).is_file():
            raise DatasetError(f"dataset {root}: shard {shard.path} listed in {INDEX_FILE} is missing")
    return index


def dataset_digest(path: str | os.PathLike[str]) -> str:
    """The content digest recorded in the index, for lineage (e.g. an MLflow dataset input)."""
    return read_index(path).digest


def _decode(key: str, parts: dict[str, bytes]) -> tuple[Sample | None, str | None]:
    """A sample from its members, or ``(None, reason)`` when it cannot be used."""
    suffix = next((s for s in _IMAGE_SUFFIXES if s in parts), None)
    if suffix is None:
        return None, "missing image"
    if "txt" not in parts:
        return None, "missing caption"
    caption = parts["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        return None, "empty caption"
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "malformed metadata"
    if not isinstance(meta, dict):
        return None, "malformed metadata"
    try:
        with Image.open(io.BytesIO(parts[suffix])) as opened:
            opened.load()
            image = to_rgb(opened)
            if image is opened:
                image = opened.copy()  # independent of the closed file
    except _DECODE_ERRORS:
        return None, "undecodable image"
    return Sample(key, image, caption, meta), None


def _iter_tar(fileobj: IO[bytes], name: str, rejected: Counter[str]) -> Iterator[Sample]:
    """Stream one tar (any readable binary file object, seekable or not) and yield its usable samples.

    Members are grouped by key (the member name up to its first dot, as WebDataset does); a group ends
    when the key changes. Unusable samples are skipped, counted in ``rejected`` by reason, and logged.

    Raises:
        DatasetError: The tar itself is truncated or not a tar.
    """

    def finish(key: str, parts: dict[str, bytes]) -> Iterator[Sample]:
        sample, reason = _decode(key, parts)
        if sample is not None:
            yield sample
        else:
            assert reason is not None
            rejected[reason] += 1
            logger.warning("%s: sample %r skipped: %s", name, key, reason)

    current: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key != current:
                    if current is not None:
                        yield from finish(current, parts)
                    current, parts = key, {}
                handle = tar.extractfile(member)
                assert handle is not None
                parts[suffix.lower()] = handle.read()
    except (tarfile.TarError, EOFError) as err:
        raise DatasetError(f"{name}: unreadable tar ({err}); check it with verify=True") from err
    if current is not None:
        yield from finish(current, parts)


class DatasetReader:
    """Stream a dataset's samples shard by shard; ``rejected`` counts the samples skipped, by reason.

    ``len()`` is the index's ``num_samples`` (what was written); an iteration yields that many minus the
    rejected ones. ``rejected`` is reset at the start of each pass.

    Args:
        path: Dataset folder.
        shuffle_shards: Visit shards in an order shuffled with ``seed`` (samples within a shard keep
            their order).
        seed: Seed of the shard order.
        verify: Check each shard's sha256 against the index before reading it.

    Raises:
        DatasetError: See :func:`read_index`; while iterating, a shard whose checksum does not match
            (``verify``) or that is not a readable tar.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, shuffle_shards: bool = False, seed: int = 0, verify: bool = False
    ) -> None:
        self.root = Path(path)
        self.index = read_index(self.root)
        self.shuffle_shards, self.seed, self.verify = shuffle_shards, seed, verify
        self.rejected: Counter[str] = Counter()

    def __len__(self) -> int:
        return self.index.num_samples

    def shard_order(self) -> list[ShardInfo]:
        """The shards in the order a pass visits them."""
        shards = list(self.index.shards)
        if self.shuffle_shards:
            random.Random(self.seed).shuffle(shards)
        return shards

    def __iter__(self) -> Iterator[Sample]:
        self.rejected.clear()
        for shard in self.shard_order():
            path = self.root / shard.path
            if self.verify and sha256_file(path) != shard.sha256:
                raise DatasetError(f"{path}: sha256 does not match {INDEX_FILE} (corrupted or modified shard)")
            with path.open("rb") as f:
                yield from _iter_tar(f, str(path), self.rejected)
        if self.rejected:
            logger.warning("%s: %d samples skipped: %s", self.root, sum(self.rejected.values()), dict(self.rejected))


def iter_samples(
    path: str | os.PathLike[str], *, shuffle_shards: bool = False, seed: int = 0, verify: bool = False
) -> Iterator[Sample]:
    """Stream a dataset's samples; use :class:`DatasetReader` directly to see what was skipped."""
    return iter(DatasetReader(path, shuffle_shards=shuffle_shards, seed=seed, verify=verify))


def load_samples(path: str | os.PathLike[str], limit: int | None = None) -> list[Sample]:
    """The first ``limit`` usable samples (all when ``None``) in a list: for small datasets and tests."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, not {limit}")
    return list(itertools.islice(iter_samples(path), limit))
