"""`mole curate` on a messy folder: every input accounted for, the filters at work, shards the trainer reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mole.cli import app
from mole.data.curate import CurateConfig, curate

skdata = pytest.importorskip("skimage.data")
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _save(image: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """A folder mixing good photos with every kind of broken or odd input; value: expected reason prefix."""
    root = tmp_path_factory.mktemp("raw")
    astronaut = Image.fromarray(skdata.astronaut())
    expected: dict[str, str | None] = {}

    _save(astronaut, root / "good" / "astronaut.png")
    (root / "good" / "astronaut.txt").write_text("The image features an astronaut in a white suit, showcasing a flag.")
    expected["good/astronaut.png"] = None
    _save(astronaut, root / "good" / "astronaut_copy 2.jpg", quality=95)
    expected["good/astronaut_copy 2.jpg"] = "duplicate"
    _save(Image.fromarray(skdata.coffee()).convert("CMYK"), root / "modes" / "café ñ cmyk.jpg")
    expected["modes/café ñ cmyk.jpg"] = None
    camera16 = Image.fromarray(skdata.camera().astype(np.uint16) * 257)
    _save(camera16, root / "modes" / "camera16.png")
    expected["modes/camera16.png"] = None
    _save(Image.fromarray(skdata.chelsea()).convert("RGBA"), root / "modes" / "chelsea rgba.png")
    expected["modes/chelsea rgba.png"] = None
    palette = Image.fromarray(skdata.immunohistochemistry()).convert("P", palette=Image.Palette.ADAPTIVE)
    _save(palette, root / "modes" / "palette.png")
    expected["modes/palette.png"] = None
    rotated = Image.fromarray(skdata.rocket()).transpose(Image.Transpose.ROTATE_90)  # stored portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    _save(rotated, root / "modes" / "rotated.jpg", exif=exif.tobytes())
    expected["modes/rotated.jpg"] = None

    (root / "bad").mkdir(parents=True, exist_ok=True)
    good_jpeg = io.BytesIO()
    astronaut.rotate(180).save(good_jpeg, format="JPEG")
    (root / "bad" / "truncated.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    expected["bad/truncated.jpg"] = "truncated or corrupt image"
    (root / "bad" / "empty.jpg").write_bytes(b"")
    expected["bad/empty.jpg"] = "empty file"
    (root / "bad" / "notes.jpg").write_text("this is not a picture")
    expected["bad/notes.jpg"] = "not an image"
    _save(astronaut.resize((20, 20)), root / "bad" / "tiny.png")
    expected["bad/tiny.png"] = "too small"
    _save(Image.new("RGB", (3000, 2000), (90, 120, 150)), root / "bad" / "huge.png")
    expected["bad/huge.png"] = "decompression bomb"
    from PIL import ImageFilter

    _save(Image.fromarray(skdata.coffee()).filter(ImageFilter.GaussianBlur(6)), root / "bad" / "blurred.png")
    expected["bad/blurred.png"] = "blur"
    return root, expected


def _config(**kw) -> CurateConfig:
    base = {"size": 64, "window": 512, "min_side": 64, "max_pixels": 4_000_000, "filters": {"blur": {}},
            "default_caption": "a photo", "inputs_per_shard": 4}  # fmt: skip
    return CurateConfig.model_validate({**base, **kw})


def test_every_input_is_accounted_for(messy, tmp_path) -> None:
    root, expected = messy
    stats = curate("scenes", root, tmp_path / "out", _config(), workers=1, progress=False)
    assert stats["inputs"] == len(expected) == stats["kept"] + stats["rejected"]
    records = {r["source"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert set(records) == set(expected)
    for source, reason in expected.items():
        rec = records[source]
        if reason is None:
            assert rec["status"] == "kept" and rec["samples"] >= 1, (source, rec["reason"])
            assert len(rec["sha256"]) == 64 and rec["scores"]
        else:
            assert rec["status"] == "rejected" and reason in rec["reason"], (source, rec["reason"])
    assert records["good/astronaut_copy 2.jpg"]["reason"] == "duplicate of good/astronaut.png"
    assert records["good/astronaut.png"]["caption"] == "an astronaut in a white suit"  # boilerplate removed
    assert records["modes/rotated.jpg"]["width"] > records["modes/rotated.jpg"]["height"]  # EXIF applied
    stats_file = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert sum(stats_file["rejected_by_reason"].values()) == stats["rejected"]


def test_training_loader_reads_exactly_the_kept_samples(messy, tmp_path) -> None:
    from mole.train.data import index_samples

    root, _ = messy
    stats = curate("scenes", root, tmp_path / "out", _config(), workers=2, progress=False)
    refs, rejected = index_samples(tmp_path / "out")
    records = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(refs) == stats["samples"] == sum(r["samples"] for r in records) and not rejected
    kept_sources = {r["source"] for r in records if r["status"] == "kept"}
    assert {ref.key.split("_")[0] for ref in refs} and len(kept_sources) == stats["kept"]


def test_rerun_resumes_and_workers_do_not_change_the_result(messy, tmp_path) -> None:
    root, _ = messy
    one = curate("scenes", root, tmp_path / "a", _config(), workers=1, progress=False)
    # Simulate an interruption: drop the last chunk and the final index, then run again.
    import shutil

    chunks = sorted((tmp_path / "a" / "chunks").iterdir())
    shutil.rmtree(chunks[-1])
    (tmp_path / "a" / "dataset.json").unlink()
    first_chunk = (chunks[0] / "manifest.jsonl").stat().st_mtime_ns
    again = curate("scenes", root, tmp_path / "a", _config(), workers=1, progress=False)
    assert (chunks[0] / "manifest.jsonl").stat().st_mtime_ns == first_chunk  # finished chunks are skipped
    two = curate("scenes", root, tmp_path / "b", _config(), workers=2, progress=False)
    a = json.loads((tmp_path / "a" / "dataset.json").read_text())
    b = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert one["samples"] == again["samples"] == two["samples"] and a["digest"] == b["digest"]
    with pytest.raises(FileExistsError):
        curate("scenes", root, tmp_path / "a", _config(), workers=1, progress=False)


def test_person_filter_rejects_background_crops_and_faces_are_cropped(tmp_path) -> None:
    root = tmp_path / "raw"
    _save(Image.fromarray(skdata.astronaut()), root / "astronaut.png")
    gradient = np.tile(np.linspace(40, 190, 512, dtype=np.uint8)[None, :, None], (512, 1, 3))
    # Sharp (blocky noise survives the downscale to the output size) but with no one in it.
    noise = np.random.default_rng(0).integers(0, 60, (64, 64, 3), dtype=np.uint8)
    _save(Image.fromarray(gradient + np.kron(noise, np.ones((8, 8, 1), np.uint8))), root / "wall.png")
    stats = curate("scenes", root, tmp_path / "scenes", _config(filters={"blur": {}, "person": {}}), workers=1,
                   progress=False)  # fmt: skip
    records = {
        r["source"]: r for r in map(json.loads, (tmp_path / "scenes" / "manifest.jsonl").read_text().splitlines())
    }
    assert records["astronaut.png"]["status"] == "kept"
    assert records["wall.png"]["status"] == "rejected" and "person" in records["wall.png"]["reason"]
    assert stats["kept"] == 1

    faces = curate("faces", root, tmp_path / "faces", _config(), workers=1, progress=False)
    face_records = {
        r["source"]: r for r in map(json.loads, (tmp_path / "faces" / "manifest.jsonl").read_text().splitlines())
    }
    assert face_records["astronaut.png"]["status"] == "kept" and faces["samples"] == 1
    assert face_records["astronaut.png"]["detections"] >= 1
    assert face_records["wall.png"]["reason"] == "no face detected"


def test_cli_names_each_reason_and_exits_zero(messy, tmp_path) -> None:
    root, _ = messy
    config = tmp_path / "c.yaml"
    config.write_text(
        "size: 64\nwindow: 512\nmin_side: 64\nmax_pixels: 4000000\nfilters: {blur: {}}\ndefault_caption: a photo\n"
    )
    result = runner.invoke(app, ["curate", "scenes", "--input", str(root), "--output", str(tmp_path / "o"),
                                 "--config", str(config), "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    for reason in (
        "empty file",
        "not an image",
        "truncated or corrupt image",
        "too small",
        "decompression bomb",
        "duplicate",
    ):
        assert reason in result.output
    bad = runner.invoke(app, ["curate", "scenes", "--input", str(root), "--output", str(tmp_path / "p"),
                              "--set", "windw=3"])  # fmt: skip
    assert bad.exit_code == 2 and "windw: unknown key" in bad.output


def test_curate_to_s3_and_train_from_it(messy, s3_server, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Local folder -> curated dataset in a real S3 bucket -> back through storage -> the trainer reads s3://."""
    from tests import storage_probes as probes

    from mole import storage
    from mole.data.shards import read_index
    from mole.train import load_config, train_stage
    from mole.train.config import parse_overrides

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.client().create_bucket(Bucket="curated")
    root, expected = messy
    config = tmp_path / "c.yaml"
    config.write_text(
        "size: 64\nwindow: 512\nmin_side: 64\nmax_pixels: 4000000\nfilters: {blur: {}}\ndefault_caption: a photo\n"
    )
    result = runner.invoke(app, ["curate", "scenes", "--input", str(root), "--output", "s3://curated/scenes",
                                 "--config", str(config), "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    uris = probes.list_uris("s3://curated/scenes")
    assert "s3://curated/scenes/dataset.json" in uris and "s3://curated/scenes/manifest.jsonl" in uris
    local = storage.localize("s3://curated/scenes", tmp_path / "back")
    index = read_index(local)
    kept = [r for r in map(json.loads, (local / "manifest.jsonl").read_text().splitlines()) if r["status"] == "kept"]
    assert index.num_samples == sum(r["samples"] for r in kept) and len(kept) == sum(
        v is None for v in expected.values()
    )
    cfg = load_config(REPO / "configs" / "tiny.yaml", parse_overrides(["stage1.validation_prompts=[]"]))
    trained = train_stage("stage1", cfg, output=tmp_path / "s1", data="s3://curated/scenes", base=str(tiny_model_dir),
                          max_steps=2)  # fmt: skip
    assert trained.steps == 2 and (tmp_path / "s1" / "model" / "model_index.json").is_file()


def test_aligned_face_datasets_are_resized_as_they_are(tmp_path) -> None:
    """CelebA-HQ / FFHQ style: already aligned close-ups, no detection; a non-square one is centre-cropped."""
    root = tmp_path / "raw"
    face = Image.fromarray(skdata.astronaut()).crop((130, 20, 380, 270))  # an aligned close-up, 250²
    _save(face, root / "00001.png")
    _save(Image.fromarray(skdata.coffee()), root / "00002.png")  # no face to detect, 600×400
    aligned = curate("faces", root, tmp_path / "a", _config(aligned=True, filters={}), workers=1, progress=False)
    records = {r["source"]: r for r in map(json.loads, (tmp_path / "a" / "manifest.jsonl").read_text().splitlines())}
    assert aligned["kept"] == 2 and all(r["aligned"] and "detections" not in r for r in records.values())
    from mole.data.shards import iter_samples

    samples = {s.meta["source"]: s for s in iter_samples(tmp_path / "a")}
    assert samples["00001.png"].meta["box"] == [0, 0, 250, 250] and samples["00001.png"].image.size == (64, 64)
    assert samples["00002.png"].meta["box"] == [100, 0, 500, 400]
    detected = curate("faces", root, tmp_path / "d", _config(filters={}), workers=1, progress=False)
    assert detected["kept"] == 1 and detected["rejected_by_reason"] == {"no face detected": 1}
