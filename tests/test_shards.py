"""The mole-shards/1 dataset format: writing, reading, verification, and what happens to bad input."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.shard_helpers import hand_built

from mole.data.shards import (
    DatasetError,
    DatasetReader,
    ShardWriter,
    _iter_tar,
    dataset_digest,
    iter_samples,
    load_samples,
    read_index,
)


def _image(seed: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write(path: Path, n: int, per_shard: int = 3, offset: int = 0, **kw) -> list[Image.Image]:
    images = [_image(offset + i) for i in range(n)]
    with ShardWriter(path, name="test", kind="faces", samples_per_shard=per_shard, **kw) as writer:
        for i, image in enumerate(images):
            writer.write(image, f"caption {offset + i}", {"score": i / 10, "source": "test"})
    return images


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _hand_built(path: Path, members: list[tuple[str, bytes]], num_samples: int) -> None:
    """A dataset written without ShardWriter, as another tool following docs/data-format.md would."""
    hand_built(path, members, num_samples)


def test_round_trip_keys_captions_meta_and_pixels_across_shards(tmp_path: Path) -> None:
    images = _write(tmp_path / "d", 7, per_shard=3)
    index = read_index(tmp_path / "d")
    assert index.num_samples == 7 and [s.num_samples for s in index.shards] == [3, 3, 1]
    assert [s.path for s in index.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["dataset.json", *[s.path for s in index.shards]]
    reader = DatasetReader(tmp_path / "d")
    samples = list(reader)
    assert len(reader) == 7 and not reader.rejected
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(7)]
    assert [s.caption for s in samples] == [f"caption {i}" for i in range(7)]
    assert samples[4].meta == {"score": 0.4, "source": "test", "width": 20, "height": 12}
    for sample, image in zip(samples, images, strict=True):
        assert sample.image.mode == "RGB" and np.array_equal(np.asarray(sample.image), np.asarray(image))


def test_explicit_keys_and_unicode_captions_survive(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "d", name="t", kind="hands") as writer:
        assert writer.write(_image(0), "  a café ☕ photo  ", key="laion-ab12") == "laion-ab12"
        assert writer.write(_image(1), "second") == "000000001"  # numbered by position
    assert [(s.key, s.caption) for s in iter_samples(tmp_path / "d")] == [
        ("laion-ab12", "a café ☕ photo"),
        ("000000001", "second"),
    ]


def test_shards_are_webdataset_tars_readable_with_plain_tarfile(tmp_path: Path) -> None:
    _write(tmp_path / "d", 4, per_shard=10)
    with tarfile.open(tmp_path / "d" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert all(m.isfile() and m.mtime == 0 for m in tar.getmembers())
        meta = json.loads(tar.extractfile("000000002.json").read())  # type: ignore[union-attr]
        caption = tar.extractfile("000000002.txt").read().decode("utf-8")  # type: ignore[union-attr]
    # Per sample: image, caption, metadata, consecutive; the key is the name up to the first dot.
    assert names == [f"{i:09d}.{ext}" for i in range(4) for ext in ("png", "txt", "json")]
    assert caption == "caption 2" and meta["width"] == 20 and meta["height"] == 12


def test_digest_is_content_addressed_and_stable(tmp_path: Path) -> None:
    _write(tmp_path / "a", 5)
    _write(tmp_path / "b", 5)
    _write(tmp_path / "c", 5, offset=1)
    index = read_index(tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert raw["format"] == "mole-shards/1" and raw["digest"] == index.digest == dataset_digest(tmp_path / "a")
    assert index.digest == hashlib.sha256("".join(s.sha256 for s in index.shards).encode()).hexdigest()
    assert dataset_digest(tmp_path / "b") == index.digest  # same content, same bytes, same digest
    assert dataset_digest(tmp_path / "c") != index.digest


def test_verify_catches_a_modified_shard(tmp_path: Path) -> None:
    _write(tmp_path / "d", 4, per_shard=2)
    assert len(list(iter_samples(tmp_path / "d", verify=True))) == 4
    shard = tmp_path / "d" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first image's bytes: still a valid tar
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-000001\.tar: sha256 does not match"):
        list(iter_samples(tmp_path / "d", verify=True))


def test_missing_malformed_and_empty_datasets_are_errors_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="not a mole dataset") as err:
        read_index(missing)
    assert str(missing) in str(err.value)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match=r"dataset\.json.*mole tiny data") as err:
        read_index(tmp_path / "bare")
    assert str(tmp_path / "bare") in str(err.value)

    (tmp_path / "bare" / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="malformed"):
        read_index(tmp_path / "bare")
    (tmp_path / "bare" / "dataset.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(DatasetError, match="mole-shards/1"):
        read_index(tmp_path / "bare")

    with ShardWriter(tmp_path / "empty", name="e", kind="faces"):
        pass  # an empty dataset can be written (curation may reject everything) but not read
    with pytest.raises(DatasetError, match="empty") as err:
        list(iter_samples(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)

    _write(tmp_path / "d", 4, per_shard=2)
    (tmp_path / "d" / "shard-000001.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard-000001\.tar .*missing") as err:
        read_index(tmp_path / "d")
    assert str(tmp_path / "d") in str(err.value)


def test_bad_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _png(_image(0))
    members = [
        ("ok1.png", good), ("ok1.txt", b"a face"), ("ok1.json", b'{"score": 1}'),
        ("nocap.png", good), ("nocap.json", b"{}"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n garbage"), ("corrupt.txt", b"broken"),
        ("noimage.txt", b"caption only"),
        ("blank.png", good), ("blank.txt", b"  \n"),
        ("badmeta.png", good), ("badmeta.txt", b"x"), ("badmeta.json", b"[1, 2"),
        ("ok2.jpg", _jpeg()), ("ok2.txt", b"a hand"),
    ]  # fmt: skip
    _hand_built(tmp_path / "d", members, num_samples=7)
    reader = DatasetReader(tmp_path / "d", verify=True)
    with caplog.at_level(logging.WARNING, logger="mole.data.shards"):
        samples = list(reader)
    assert [(s.key, s.caption, s.meta) for s in samples] == [("ok1", "a face", {"score": 1}), ("ok2", "a hand", {})]
    assert reader.rejected == Counter(
        {"missing caption": 1, "undecodable image": 1, "missing image": 1, "empty caption": 1, "malformed metadata": 1}
    )
    assert "'nocap' skipped: missing caption" in caplog.text and "'corrupt' skipped: undecodable image" in caplog.text
    list(reader)
    assert sum(reader.rejected.values()) == 5  # counts are per pass, not accumulated


def _jpeg() -> bytes:
    buf = io.BytesIO()
    _image(3).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_truncated_shard_is_a_dataset_error_not_a_tarfile_crash(tmp_path: Path) -> None:
    _write(tmp_path / "d", 3, per_shard=10)
    shard = tmp_path / "d" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DatasetError, match=r"shard-000000\.tar: unreadable tar"):
        list(iter_samples(tmp_path / "d"))


def test_tar_reading_works_on_a_non_seekable_stream(tmp_path: Path) -> None:
    _write(tmp_path / "d", 3, per_shard=10)

    class Stream(io.RawIOBase):  # what an S3 body looks like: read() only
        def __init__(self, data: bytes) -> None:
            self.buf = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[override]
            chunk = self.buf.read(min(len(b), 1000))
            b[: len(chunk)] = chunk
            return len(chunk)

    rejected: Counter[str] = Counter()
    samples = list(_iter_tar(Stream((tmp_path / "d" / "shard-000000.tar").read_bytes()), "s3://x", rejected))
    assert [s.caption for s in samples] == ["caption 0", "caption 1", "caption 2"] and not rejected


def test_exception_inside_writer_leaves_no_dataset(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="crash"),
        ShardWriter(tmp_path / "d", name="t", kind="faces", samples_per_shard=1) as w,
    ):
        w.write(_image(0), "one")  # a complete shard
        w.write(_image(1), "two")
        raise RuntimeError("crash while writing")
    assert list((tmp_path / "d").iterdir()) == []
    with pytest.raises(DatasetError, match="not a mole dataset"):
        read_index(tmp_path / "d")


def test_writer_rejects_bad_keys_and_captions(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "d", name="t", kind="faces") as writer:
        writer.write(_image(0), "a", key="x1")
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(_image(0), "b", key="x1")
        for bad in ("a.b", "a/b", "", "a\\b"):
            with pytest.raises(ValueError, match="invalid sample key"):
                writer.write(_image(0), "b", key=bad)
        for caption in ("", "  \n\t"):
            with pytest.raises(ValueError, match="caption"):
                writer.write(_image(0), caption)
    assert read_index(tmp_path / "d").num_samples == 1  # rejected writes left no trace
    with pytest.raises(ValueError, match="closed"):
        writer.write(_image(0), "late")


def test_existing_dataset_needs_overwrite_which_removes_old_shards(tmp_path: Path) -> None:
    _write(tmp_path / "d", 6, per_shard=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardWriter(tmp_path / "d", name="t", kind="faces")
    _write(tmp_path / "d", 1, per_shard=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["dataset.json", "shard-000000.tar"]
    assert [s.caption for s in load_samples(tmp_path / "d")] == ["caption 0"]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_every_image_mode_is_stored_as_8bit_rgb(tmp_path: Path, mode: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.linspace(0, 65535, 240).astype(np.uint16).reshape(12, 20))
        assert image.mode == "I;16"
    else:
        image = _image(1).convert(mode)
    if mode in ("RGBA", "LA"):
        alpha = Image.new("L", image.size, 255)
        alpha.putpixel((0, 0), 0)
        image.putalpha(alpha)
    with ShardWriter(tmp_path / "d", name="t", kind="faces") as writer:
        writer.write(image, "caption")
    (sample,) = load_samples(tmp_path / "d")
    pixels = np.asarray(sample.image)
    assert sample.image.mode == "RGB" and pixels.dtype == np.uint8 and sample.image.size == (20, 12)
    if mode in ("RGBA", "LA"):
        assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent composited on white, not black
    if mode == "I;16":
        assert pixels.max() == 255 and pixels.min() == 0  # the 16-bit range is scaled, not clipped


def test_exif_orientation_is_applied_before_the_exif_is_dropped(tmp_path: Path) -> None:
    image = _image(2, size=(20, 12))
    image.getexif()[0x0112] = 6  # "rotate 90° clockwise to display"
    with ShardWriter(tmp_path / "d", name="t", kind="faces") as writer:
        writer.write(image, "rotated")
    (sample,) = load_samples(tmp_path / "d")
    assert sample.image.size == (12, 20) and sample.meta["width"] == 12


def test_shard_order_shuffles_deterministically_and_load_samples_limits(tmp_path: Path) -> None:
    _write(tmp_path / "d", 8, per_shard=1)
    order = [s.caption for s in iter_samples(tmp_path / "d", shuffle_shards=True, seed=1)]
    assert order == [s.caption for s in iter_samples(tmp_path / "d", shuffle_shards=True, seed=1)]
    assert sorted(order) == [f"caption {i}" for i in range(8)] and order != sorted(order)
    assert order != [s.caption for s in iter_samples(tmp_path / "d", shuffle_shards=True, seed=2)]
    assert [s.caption for s in load_samples(tmp_path / "d", limit=2)] == ["caption 0", "caption 1"]
