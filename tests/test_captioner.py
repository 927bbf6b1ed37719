"""Captioner and CLIP-score filter with tiny random transformers models loaded from standard folders.

Random weights caption gibberish: these tests check the loading and generation path (captions produced,
batched, prompt cut, per-crop captions and CLIP scores in the manifest, failures accounted for), not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.captioner_models import build_blip, build_blip2, build_clip, build_llava
from typer.testing import CliRunner

from mole.cli import app
from mole.data.captioner import PAPER_PROMPT, Captioner, ClipScorer
from mole.data.curate import CurateConfig, curate

skdata = pytest.importorskip("skimage.data")
runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"blip": build_blip(root / "blip"), "blip2": build_blip2(root / "blip2"),
            "llava": build_llava(root / "llava"), "clip": build_clip(root / "clip")}  # fmt: skip


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _count_generate(captioner: Captioner) -> list[int]:
    calls: list[int] = []
    original = captioner.model.generate

    def generate(**kw):
        calls.append(int(kw["pixel_values"].shape[0]))
        return original(**kw)

    captioner.model.generate = generate
    return calls


@pytest.mark.parametrize("family", ["blip", "blip2", "llava"])
def test_captioner_generates_in_batches_and_returns_only_the_answer(models, family: str) -> None:
    captioner = Captioner(models[family], batch_size=2, max_new_tokens=6, device="cpu")
    calls = _count_generate(captioner)
    images = _images(5)
    captions = captioner.caption(images)
    assert calls == [2, 2, 1] and len(captions) == 5 and all(isinstance(c, str) for c in captions)
    assert any(captions)
    # The same answer one image at a time: batching (left padding for decoder-only models) changes nothing.
    assert captioner.caption(images[:1]) == captions[:1]
    # The answer is only what the model added after the prompt.
    processor, model = captioner.processor, captioner.model
    text = captioner._text()
    inputs = processor(images=[images[0].convert("RGB")], text=[text] if text else None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    full = processor.tokenizer.decode(out[0], skip_special_tokens=True).strip()
    assert full.endswith(captions[0])
    if text:  # the prompt came back from generate and was cut
        assert len(full) > len(captions[0])


def test_chat_models_get_the_paper_prompt_and_blip_continues_a_prefix(models) -> None:
    llava = Captioner(models["llava"], device="cpu", max_new_tokens=4)
    assert llava.chat and llava.prompt == PAPER_PROMPT
    assert "<image>" in llava._text() and PAPER_PROMPT in llava._text()
    blip = Captioner(models["blip"], prompt="a photo of", device="cpu", max_new_tokens=4)
    assert not blip.chat and blip._text() == "a photo of"
    [caption] = blip.caption(_images(1))
    with torch.no_grad():
        inputs = blip.processor(images=_images(1), text=["a photo of"], return_tensors="pt")
        full = blip.processor.tokenizer.decode(
            blip.model.generate(**inputs, max_new_tokens=4)[0], skip_special_tokens=True
        )
    assert full.startswith("a photo of") and full[len("a photo of") :].strip() == caption


def test_blip2_gets_its_query_tokens_from_its_processor_not_from_the_prompt(models) -> None:
    blip2 = Captioner(models["blip2"], prompt="a photo of", device="cpu", max_new_tokens=4, batch_size=3)
    assert blip2._text() == "a photo of"  # the processor prepends the Q-Former's image tokens itself
    captions = blip2.caption(_images(3))
    assert len(captions) == 3 and not any(c.startswith("a photo of") and len(c) == len("a photo of") for c in captions)


def test_captioner_refuses_what_is_not_a_captioner(models, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        Captioner(tmp_path / "nothing")
    with pytest.raises(ValueError, match="image-text-to-text"):
        Captioner(models["clip"], device="cpu")


def test_clip_scorer_scores_pairs(models) -> None:
    from mole.evaluate.scorers import build_scorer

    scorer = ClipScorer(models["clip"], device="cpu", batch_size=2)
    images, texts = _images(3), ["a man", "a woman in red", "a child"]
    scores = scorer(images, texts)
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)
    reference = build_scorer("clip", {"model": str(models["clip"])}, device="cpu").score(images, texts)
    np.testing.assert_allclose(scores, reference, atol=1e-5)


def _scene_folder(root: Path) -> Path:
    """Two 2-window scenes (one with a sidecar caption) and one close-up."""
    astronaut = Image.fromarray(skdata.astronaut())  # 512²
    wide = Image.new("RGB", (1024, 512))
    wide.paste(astronaut, (0, 0))
    wide.paste(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    root.mkdir(parents=True, exist_ok=True)
    wide.save(root / "wide.png")
    wide.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(root / "captioned.png")
    (root / "captioned.txt").write_text("The image features two astronauts, creating a serene atmosphere.")
    return root


def test_curate_scenes_captions_each_crop_and_scores_it_with_clip(models, tmp_path: Path) -> None:
    raw = _scene_folder(tmp_path / "raw")
    result = runner.invoke(app, ["curate", "scenes", "--input", str(raw), "--output", str(tmp_path / "out"),
                                 "--workers", "1", "--set", f"captioner={models['blip']}",
                                 "--set", f"clip_model={models['clip']}", "--set", "min_clip_score=0",
                                 "--set", "window=512", "--set", "size=64", "--set", "min_side=64",
                                 "--set", "filters={blur: {}}", "--set", "captioner_batch_size=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = {r["source"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert {r["status"] for r in records.values()} == {"kept"}, records
    for rec in records.values():
        assert rec["crops"] == 2 and len(rec["crop_captions"]) == 2
        for crop, scores in zip(rec["crop_captions"], rec["scores"], strict=True):
            assert 0.0 <= scores["clip"] <= 100.0
            # Gibberish from random weights may clean to nothing: then the photo's caption stands in, labelled.
            assert crop["caption_source"] in ("captioner", "sidecar (fallback)") and crop["caption"]
    from mole.data.shards import iter_samples

    samples = list(iter_samples(tmp_path / "out"))
    assert len(samples) == 4 and all(s.meta["caption_source"] for s in samples)
    assert all("clip" in s.meta["scores"] for s in samples)


def test_clip_threshold_rejects_crops_with_the_score_in_the_manifest(models, tmp_path: Path) -> None:
    raw = _scene_folder(tmp_path / "raw")
    cfg = CurateConfig(window=512, size=64, min_side=64, filters={"blur": {}}, default_caption="a photo",
                       clip_model=str(models["clip"]), min_clip_score=101.0)  # fmt: skip
    stats = curate("scenes", raw, tmp_path / "out", cfg, workers=1, progress=False)
    assert stats["kept"] == 0 and stats["rejected"] == 2
    assert stats["crops_rejected_by_reason"] == {"clip score < 101": 4}
    for rec in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()):
        assert all("clip" in s for s in rec["scores"]) and "clip score" in rec["reason"]


def test_faces_with_a_chat_captioner(models, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(skdata.astronaut()).save(raw / "astronaut.png")
    cfg = CurateConfig(size=64, min_side=64, filters={}, captioner=str(models["llava"]), aligned=True,
                       default_caption="a person")  # fmt: skip
    curate("faces", raw, tmp_path / "out", cfg, workers=1, progress=False)
    [rec] = map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())
    assert (
        rec["status"] == "kept"
        and rec["aligned"] is True
        and rec["crop_captions"][0]["caption_source"]
        in (
            "captioner",
            "default (fallback)",
        )
    )


def test_failing_model_calls_lose_no_input(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A captioner or CLIP model that raises: every input still in the manifest, with the reason."""
    raw = _scene_folder(tmp_path / "raw")

    def broken(self, images):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Captioner, "_batch", broken)
    cfg = CurateConfig(window=512, size=64, min_side=64, filters={"blur": {}}, captioner=str(models["blip"]))
    stats = curate("scenes", raw, tmp_path / "a", cfg, workers=1, progress=False)
    records = {r["source"]: r for r in map(json.loads, (tmp_path / "a" / "manifest.jsonl").read_text().splitlines())}
    assert stats["inputs"] == 2 == stats["kept"] + stats["rejected"]
    assert records["captioned.png"]["status"] == "kept"  # the sidecar stands in, and says so
    assert {c["caption_source"] for c in records["captioned.png"]["crop_captions"]} == {"sidecar (fallback)"}
    assert records["captioned.png"]["caption"] == "two astronauts"
    assert "captioner error: RuntimeError" in records["captioned.png"]["captioner_error"]
    assert records["wide.png"]["status"] == "rejected" and "no caption" in records["wide.png"]["reason"]
    assert "captioner error" in records["wide.png"]["caption_errors"][0]["reason"]

    def broken_clip(self, images, texts):
        raise RuntimeError("clip exploded")

    monkeypatch.setattr(ClipScorer, "__call__", broken_clip)
    cfg = CurateConfig(window=512, size=64, min_side=64, filters={"blur": {}}, default_caption="a photo",
                       clip_model=str(models["clip"]))  # fmt: skip
    stats = curate("scenes", raw, tmp_path / "b", cfg, workers=1, progress=False)
    records = [json.loads(x) for x in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    assert stats["rejected"] == 2 and len(records) == 2
    assert all(r["reason"] == "error: RuntimeError: clip exploded" for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_that_cannot_load_stops_curation_clearly(models, tmp_path: Path, workers: int) -> None:
    """Not an input's fault: the run stops with the reason (in worker processes too, instead of hanging)."""
    raw = _scene_folder(tmp_path / "raw")
    result = runner.invoke(app, ["curate", "scenes", "--input", str(raw), "--output", str(tmp_path / "out"),
                                 "--workers", str(workers), "--set", f"captioner={models['clip']}"])  # fmt: skip
    assert result.exit_code == 2 and "image-text-to-text" in result.output, result.output


def test_close_ups_of_several_inputs_are_captioned_in_one_call(models, tmp_path: Path, monkeypatch) -> None:
    """Faces and hands give one crop per input: the captioner gets the crops of a group of inputs at once."""
    raw = tmp_path / "raw"
    raw.mkdir()
    astronaut = Image.fromarray(skdata.astronaut())
    for i in range(5):
        astronaut.rotate(3 * i).save(raw / f"{i}.png")
    (raw / "2.txt").write_text("an astronaut smiling")  # has its own caption: not sent to the captioner
    calls: list[int] = []
    original = Captioner.caption

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(Captioner, "caption", counting)
    cfg = CurateConfig(size=64, min_side=64, filters={}, captioner=str(models["llava"]), aligned=True,
                       default_caption="a person", captioner_batch_size=3, dedup_distance=None)  # fmt: skip
    stats = curate("faces", raw, tmp_path / "out", cfg, workers=1, progress=False)
    assert stats["kept"] == 5 and calls == [2, 2]  # groups of 3 inputs, less the one with a sidecar
    records = {r["source"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert records["2.png"]["caption_source"] == "sidecar" and records["2.png"]["caption"] == "an astronaut smiling"
    assert {records[f"{i}.png"]["caption_source"] for i in (0, 1, 3, 4)} <= {"captioner", "default (fallback)"}
