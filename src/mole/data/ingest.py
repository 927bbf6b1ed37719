"""Reading raw inputs safely: every file either becomes an RGB image or a named rejection reason.

Handles what real scraped folders contain: truncated JPEGs, empty files, text files named ``.jpg``,
decompression bombs, EXIF-rotated photos, CMYK / palette / alpha / 16-bit modes, names with spaces and
non-ASCII letters. Also sidecar captions and attribute/provenance tables.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from mole.data.shards import to_rgb

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Default pixel budget: above this an image is refused as a decompression bomb (PIL's own default ×1).
MAX_PIXELS = 89_478_485


class Rejected(Exception):
    """An input that is refused, with the manifest's reason string."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def list_images(root: Path) -> list[Path]:
    """Every file under ``root`` that looks like an image by suffix, sorted (a stable input order).

    Symbolic links are listed too, broken and looping ones included, so that each is accounted for (curation
    rejects those that do not lead to a file inside ``root``: :func:`check_inside`).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    return sorted(p for p in root.rglob("*") if (p.is_symlink() or p.is_file()) and p.suffix.lower() in IMAGE_SUFFIXES)


def check_inside(path: Path, root: Path) -> None:
    """Refuse a path that is not a regular file inside ``root`` once links are followed.

    Raises:
        Rejected: ``broken or looping symlink``, ``symlink outside the input folder``, ``not a regular file``.
    """
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise Rejected("broken or looping symlink") from None
    if not real.is_relative_to(root.resolve()):
        raise Rejected("symlink outside the input folder")
    if not real.is_file():
        raise Rejected("not a regular file")


def _inside(path: Path, root: Path | None) -> bool:
    if root is None:
        return True
    try:
        check_inside(path, root)
    except Rejected:
        return False
    return True


def load_image(
    path: Path, max_pixels: int = MAX_PIXELS, min_side: int = 64, max_aspect: float | None = None
) -> Image.Image:
    """Decode, refuse bombs and (with ``max_aspect``) extreme shapes before decoding, apply EXIF orientation,
    convert to 8-bit RGB.

    Raises:
        Rejected: ``empty file``, ``not an image``, ``truncated or corrupt image``, ``decompression bomb``,
            ``extreme aspect ratio``, ``too small``.
    """
    if path.stat().st_size == 0:
        raise Rejected("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as probe:
                w, h = probe.size
                if w * h > max_pixels:
                    raise Rejected(f"decompression bomb ({w}×{h} > {max_pixels} pixels)")
                if max_aspect is not None and max(w, h) > max_aspect * max(1, min(w, h)):
                    raise Rejected(f"extreme aspect ratio ({w}×{h}, more than {max_aspect:g}:1)")
                image = ImageOps.exif_transpose(probe)  # loads the pixels; raises on truncation
                image.load()
                image = to_rgb(image)
        except Rejected:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise Rejected(f"decompression bomb ({err})") from None
        except UnidentifiedImageError:
            raise Rejected("not an image") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise Rejected(f"truncated or corrupt image ({type(err).__name__})") from None
    if min(image.size) < min_side:
        raise Rejected(f"too small ({image.width}×{image.height} < {min_side}px)")
    return image


def sidecar_caption(path: Path, root: Path | None = None) -> str | None:
    """``photo.txt`` or ``photo.json`` (key ``caption`` or ``text``) beside ``photo.jpg``, if any; with ``root``,
    a sidecar that is a link leading outside ``root`` (to ``/etc/hostname``, say) is ignored."""
    txt = path.with_suffix(".txt")
    if txt.is_file() and _inside(txt, root):
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    js = path.with_suffix(".json")
    if js.is_file() and _inside(js, root):
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            logger.warning("%s: sidecar JSON is malformed; ignored", js)
            return None
        if isinstance(data, dict):
            for key in ("caption", "text", "prompt"):
                if isinstance(data.get(key), str) and data[key].strip():
                    return data[key].strip()
    return None


_NAME_COLUMNS = ("file_name", "filename", "file", "image", "imagename", "image_name", "image_id", "path", "name")


@dataclass
class Table:
    """A CSV/TSV/JSON table keyed by file name (basename or relative path), e.g. 11k Hands' HandInfo.csv,
    CelebA attribute lists converted to CSV, or a sources file with license/provenance columns."""

    rows: dict[str, dict[str, Any]]

    def lookup(self, path: Path, root: Path) -> dict[str, Any]:
        rel = path.relative_to(root).as_posix()
        return self.rows.get(rel) or self.rows.get(path.name) or self.rows.get(path.stem) or {}


def read_table(path: str | os.PathLike[str] | None) -> Table:
    """Read a table whose first column naming a file (``file_name``, ``imageName``, ``image_id``...) is the key.

    Raises:
        ValueError: Unreadable file or no file-name column.
    """
    if path is None:
        return Table({})
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table not found: {p}")
    if p.suffix.lower() in (".json", ".jsonl"):
        text = p.read_text(encoding="utf-8")
        records = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if p.suffix == ".jsonl"
            else json.loads(text)
        )
        if isinstance(records, dict):
            return Table({str(k): dict(v) for k, v in records.items()})
    else:
        with p.open(newline="", encoding="utf-8") as f:
            sample = f.read(4096)
            f.seek(0)
            dialect = csv.Sniffer().sniff(sample, delimiters=",\t;") if sample else csv.excel
            records = list(csv.DictReader(f, dialect=dialect))
    if not records:
        return Table({})
    columns = {c.lower().replace(" ", ""): c for c in records[0]}
    key = next((columns[c] for c in _NAME_COLUMNS if c in columns), None)
    if key is None:
        raise ValueError(f"{p}: no file-name column (one of {', '.join(_NAME_COLUMNS)}) in {list(records[0])}")
    return Table({str(r[key]): {k: v for k, v in r.items() if k != key} for r in records})


def describe(paths: Iterable[Path]) -> str:
    """A short human summary for logs: count and total size."""
    paths = list(paths)
    size = sum(p.stat().st_size for p in paths)
    return f"{len(paths)} files, {size / 1e6:.1f} MB"
