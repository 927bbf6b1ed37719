"""Curation that cannot silently lose or mix data: resumes prove they continue the same work, --sources stays
in its own key, symlinks stay inside --input, extreme shapes are refused, bad configs get errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mole.cli import app
from mole.data.curate import CurateConfig, curate

runner = CliRunner()


def _raw(root: Path, count: int, start: int = 0, prefix: str = "img") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / f"{prefix}{i:03d}.png")
    return root


def _cfg(**kw) -> CurateConfig:
    base = {"size": 32, "window": 96, "min_side": 32, "filters": {}, "default_caption": "a photo",
            "inputs_per_shard": 2, "dedup_distance": None}  # fmt: skip
    return CurateConfig.model_validate({**base, **kw})


def _interrupt(out: Path) -> None:
    """What a SIGKILL leaves: finished chunks, the last one dropped, no index."""
    shutil.rmtree(sorted((out / "chunks").iterdir())[-1])
    (out / "dataset.json").unlink()


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


# --- resume proves it is the same work -----------------------------------------------------------------------


def test_resume_with_added_inputs_is_refused_and_overwrite_redoes(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw", 6), tmp_path / "out"
    curate("scenes", raw, out, _cfg(), workers=1, progress=False)
    _interrupt(out)
    _raw(raw, 2, start=100)  # two new inputs that sort last
    _raw(raw, 1, start=200, prefix="a")  # and one that sorts first: every chunk's contents shift
    with pytest.raises(ValueError, match=r"input files changed \(6 -> 9 files"):
        curate("scenes", raw, out, _cfg(), workers=1, progress=False)
    stats = curate("scenes", raw, out, _cfg(), workers=1, progress=False, overwrite=True)
    sources = [r["source"] for r in _records(out)]
    assert stats["inputs"] == 9 and len(sources) == len(set(sources)) == 9


def test_resume_with_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw", 6), tmp_path / "out"
    curate("scenes", raw, out, _cfg(), workers=1, progress=False)
    _interrupt(out)
    with pytest.raises(ValueError, match=r"size: 32 -> 16.*image_format: 'png' -> 'jpg'|image_format.*size"):
        curate("scenes", raw, out, _cfg(size=16, image_format="jpg"), workers=1, progress=False)
    again = curate("scenes", raw, out, _cfg(), workers=1, progress=False)  # the same work resumes
    assert again["inputs"] == 6 and again["kept"] == 6


def test_cli_resume_refusal_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw", 4), tmp_path / "out"
    args = [
        "curate",
        "scenes",
        "--input",
        str(raw),
        "--output",
        str(out),
        "--set",
        "size=32",
        "--set",
        "window=96",
        "--set",
        "min_side=32",
        "--set",
        "default_caption=x",
        "--set",
        "inputs_per_shard=2",
        "--workers",
        "1",
    ]
    assert runner.invoke(app, args).exit_code == 0
    _interrupt(out)
    result = runner.invoke(app, [*args, "--set", "image_format=jpg"])
    assert result.exit_code == 2 and "--overwrite" in result.output and "image_format" in result.output


# --- --sources cannot touch the record's own fields ------------------------------------------------------------


def test_sources_columns_stay_under_their_own_key(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw", 3), tmp_path / "out"
    (raw / "img001.png").write_bytes(b"not a png")  # unreadable: must stay rejected
    table = tmp_path / "sources.csv"
    table.write_text(
        "file_name,source,status,reason,samples,license\n"
        "img000.png,../../etc/shadow,approved,none,99,CC-BY-4.0\n"
        "img001.png,elsewhere,kept,,5,CC0\n"
    )
    stats = curate("scenes", raw, out, _cfg(), workers=1, progress=False, sources=table)
    records = {r["source"]: r for r in _records(out)}
    assert set(records) == {"img000.png", "img001.png", "img002.png"}
    assert records["img000.png"]["status"] == "kept" and records["img000.png"]["samples"] == 1
    assert records["img000.png"]["license"] == "CC-BY-4.0"
    assert records["img000.png"]["provenance"]["source"] == "../../etc/shadow"
    assert records["img001.png"]["status"] == "rejected" and records["img001.png"]["reason"] == "not an image"
    assert stats["kept"] == 2 and stats["rejected"] == 1


# --- symlinks and extreme shapes ----------------------------------------------------------------------------


def test_symlinks_stay_inside_input_and_broken_ones_are_rejected(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path / "raw", 2), tmp_path / "out"
    outside = _raw(tmp_path / "elsewhere", 1, start=50)
    secret = tmp_path / "hostname"
    secret.write_text("secret-host-name")
    (raw / "img000.txt").symlink_to(secret)  # a sidecar caption leading outside --input
    (raw / "img001.txt").write_text("a kept caption")
    (raw / "inside.png").symlink_to(raw / "img001.png")  # a link inside --input is fine
    (raw / "outside.png").symlink_to(outside / "img050.png")
    (raw / "broken.png").symlink_to(tmp_path / "missing.png")
    (raw / "loop.png").symlink_to(raw / "loop.png")
    stats = curate("scenes", raw, out, _cfg(), workers=1, progress=False)
    records = {r["source"]: r for r in _records(out)}
    assert set(records) == {"img000.png", "img001.png", "inside.png", "outside.png", "broken.png", "loop.png"}
    assert records["img000.png"]["caption"] == "a photo"  # the default, not the linked file's text
    assert "secret-host-name" not in (out / "manifest.jsonl").read_text()
    assert records["inside.png"]["status"] == "kept"
    assert records["outside.png"]["reason"] == "symlink outside the input folder"
    assert records["broken.png"]["reason"] == records["loop.png"]["reason"] == "broken or looping symlink"
    assert stats["inputs"] == 6 and stats["kept"] + stats["rejected"] == 6


def test_extreme_aspect_ratio_is_rejected_before_decoding(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    Image.new("RGB", (256, 40000), (120, 90, 60)).save(raw / "strip.png")
    _raw(raw, 1)
    stats = curate("faces", raw, out, _cfg(require_detection=False), workers=1, progress=False)
    records = {r["source"]: r for r in _records(out)}
    assert records["strip.png"]["status"] == "rejected"
    assert records["strip.png"]["reason"].startswith("extreme aspect ratio (256×40000")
    assert stats["kept"] == 1 and "width" not in records["strip.png"]  # refused from the header, never decoded


# --- errors, not tracebacks --------------------------------------------------------------------------------------


def test_config_and_output_mistakes_are_errors_not_tracebacks(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "raw", 1)
    empty, binary, a_file = tmp_path / "empty.yaml", tmp_path / "binary.yaml", tmp_path / "a_file"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 4)
    a_file.write_text("x")
    ok = ["--set", "size=32", "--set", "window=96", "--set", "min_side=32", "--set", "default_caption=x",
          "--workers", "1"]  # fmt: skip
    cases = [
        (["curate", "scenes", "--input", str(raw), "--output", str(tmp_path / "o1"), "--config", str(empty), *ok,
          "--set", "filters.blur.min_variance=1"], None),
        (["curate", "scenes", "--input", str(raw), "--output", str(tmp_path / "o2"), "--config", str(binary)],
         "not UTF-8 text"),
        (["curate", "scenes", "--input", str(raw), "--output", str(a_file), *ok], "is an existing file"),
        (["train", "stage1", "--config", str(binary)], "not UTF-8 text"),
        (["curate", "scenes", "--input", str(raw), "--output", str(tmp_path / "o3"), *ok,
          "--set", "filters.blur.threshold=1", "--workers", "2"], "unknown option 'threshold'"),
    ]  # fmt: skip
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        if message is None:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert a_file.read_text() == "x"


def test_train_output_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    from mole.data.synthetic import write_dataset

    write_dataset(tmp_path / "d", "faces", 2, seed=0, size=32)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    repo = Path(__file__).resolve().parents[1]
    result = runner.invoke(app, ["train", "stage1", "--config", str(repo / "configs" / "tiny.yaml"), "--data",
                                 str(tmp_path / "d"), "--output", str(a_file)])  # fmt: skip
    assert result.exit_code == 2 and "is an existing file" in result.output, result.output


def test_worker_setup_failure_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """An initializer that raises makes multiprocessing.Pool respawn workers forever; it must fail instead."""
    from mole.data.curate import WorkerSetupError

    raw = _raw(tmp_path / "raw", 2)
    with pytest.raises(WorkerSetupError, match="clip"):
        curate("scenes", raw, tmp_path / "out", _cfg(clip_model=str(tmp_path / "no-such-clip")), workers=2,
               progress=False)  # fmt: skip
