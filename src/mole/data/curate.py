"""`mole curate`: raw images → filtered, cropped, captioned, de-duplicated mole-shards datasets (paper §2).

Every input file is accounted for in ``manifest.jsonl`` (one record per input: ``kept`` or ``rejected`` with
the reason, its sha256, every filter score, the samples it produced, its license/provenance), and
``stats.json`` counts inputs per status and reason: kept + rejected = inputs, always.

Work is split into chunks of ``inputs_per_shard`` inputs, each written as one shard plus its manifest part
under ``chunks/NNNNNN/``; a rerun skips chunks that are complete, so an interrupted curation resumes. The
per-input work (decode, filters, crops, hashes, captions) runs in worker processes; de-duplication runs in
input order in the main process, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mole import atomic
from mole.data.crops import Deduplicator, crop_resize, phash, sliding_windows
from mole.data.curate_state import STATE_FILE, begin, work_state
from mole.data.ingest import (
    MAX_PIXELS,
    Rejected,
    Table,
    check_inside,
    list_images,
    load_image,
    read_table,
    sidecar_caption,
)
from mole.data.shards import (
    INDEX_FILE,
    DatasetIndex,
    ShardInfo,
    ShardWriter,
    compute_digest,
    read_index,
    sha256_file,
)

logger = logging.getLogger(__name__)

Kind = Literal["scenes", "faces", "hands"]


class CurateConfig(BaseModel):
    """Curation settings (``configs/curate.yaml`` shows them all); every threshold is here, every score is
    written to the manifest."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    size: int = Field(512, ge=16)
    """Side of the output images (the paper: 512)."""
    window: int = Field(1024, ge=16)
    """Scenes: sliding-window side in source pixels (the paper: 1024)."""
    stride: int | None = Field(None, ge=1)
    """Scenes: window step; default the window (tiles, the last one aligned with the edge)."""
    min_side: int = Field(256, ge=16)
    """Inputs whose short side is below this are rejected as too small."""
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    """Inputs above this many pixels are refused as decompression bombs."""
    max_aspect: float = Field(8.0, ge=1)
    """Inputs whose long side is more than this many times the short side are refused before decoding: a
    256×40000 strip cost 30 s and 3 GB in face detection and holds no usable close-up or scene."""
    margin: float = Field(0.4, ge=0)
    """Faces/hands: margin around the detected box, as a fraction of its side, on each side."""
    filters: dict[str, dict[str, Any]] | None = None
    """Filter name → options, applied to every output crop; default per kind (scenes: blur + person,
    faces/hands: blur)."""
    hand_model: str | None = None
    """Hands: a local YOLO-style ONNX hand detector; without one, inputs are taken as close-ups and
    center-cropped (11k Hands style)."""
    require_detection: bool = True
    """Faces: reject inputs where no face is found (else center-crop them as already-aligned close-ups)."""
    dedup_distance: int | None = Field(4, ge=0, lt=32)
    """Perceptual-hash Hamming distance at or below which an input is a duplicate; null disables."""
    default_caption: str | None = None
    """Caption for inputs with no sidecar caption and no captioner; null rejects them ("no caption")."""
    captioner: str | None = None
    """A local transformers image-text-to-text model folder (BLIP, BLIP-2, LLaVA...). Scenes: every kept
    window is captioned on its own (the photo's sidecar caption is the fallback); faces/hands: inputs
    without a sidecar caption are captioned."""
    captioner_prompt: str | None = None
    """Prompt for the captioner; chat models default to the paper's "Describe this image in one sentence
    with details.", plain captioners (BLIP) continue it as a prefix."""
    captioner_batch_size: int = Field(8, ge=1)
    """Crops per captioner ``generate`` call; with a captioner, this many inputs are also processed together,
    so that close-ups (one crop per input) fill the batch."""
    aligned: bool = False
    """Faces: inputs are already aligned close-ups (CelebA-HQ, FFHQ): no detection, the image is resized as it
    is (a non-square one centre-cropped), as the paper uses these datasets."""
    tokenizer: str | None = None
    """A CLIP tokenizer folder for exact 77-token truncation (default: mole's conservative BPE)."""
    clip_model: str | None = None
    """A local CLIP model for the CLIP-score filter; null disables it."""
    min_clip_score: float = 20.0
    """Crops whose CLIP score is below this are dropped (with clip_model)."""
    inputs_per_shard: int = Field(256, ge=1)
    """Inputs per chunk: one shard and one manifest part each; the unit of resumption."""
    image_format: Literal["png", "jpg", "webp"] = "png"
    """Encoding of the output images."""


DEFAULT_FILTERS: dict[str, dict[str, dict[str, Any]]] = {
    "scenes": {"blur": {}, "person": {}},
    "faces": {"blur": {}},
    "hands": {"blur": {}},
}


@dataclass
class InputResult:
    """What one input produced: its manifest record and the samples (image, caption, meta, key)."""

    record: dict[str, Any]
    samples: list[tuple[Any, str, dict[str, Any], str]] = field(default_factory=list)
    hash: int | None = None


class _Worker:
    """Per-process state: filters, detectors and models are built once per worker, not per image."""

    def __init__(self, kind: Kind, cfg: CurateConfig, root: str, attributes: Table, sources: Table) -> None:
        from mole.data.captions import CaptionTruncator, clean_caption
        from mole.data.filtering import build_filters

        self.kind, self.cfg, self.root = kind, cfg, Path(root)
        self.attributes, self.sources = attributes, sources
        self.filters = build_filters(cfg.filters if cfg.filters is not None else DEFAULT_FILTERS[kind])
        self.truncate = CaptionTruncator(cfg.tokenizer)
        self.clean = clean_caption
        self.face = self.hand = self.captioner = self.clip = None
        if kind == "faces" and not cfg.aligned:
            from mole.data.filters import FaceDetector

            self.face = FaceDetector()
        if kind == "hands" and cfg.hand_model:
            from mole.data.filters import HandDetector

            self.hand = HandDetector(cfg.hand_model)
        if cfg.captioner:
            from mole.data.captioner import Captioner

            self.captioner = Captioner(cfg.captioner, cfg.captioner_prompt, batch_size=cfg.captioner_batch_size)
        if cfg.clip_model:
            from mole.data.captioner import ClipScorer

            self.clip = ClipScorer(cfg.clip_model)

    def crops(self, image, record: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        """Output-size crops of one input, each with its geometry."""
        from mole.data.filters import square_crop_around

        size = self.cfg.size
        if self.kind == "scenes":
            boxes = sliding_windows(image.width, image.height, self.cfg.window, self.cfg.stride)
            return [(crop_resize(image, b, size), {"box": list(b)}) for b in boxes]
        if self.kind == "faces" and self.cfg.aligned:
            record["aligned"] = True  # an aligned close-up: resized as it is (the centred square if not square)
        detector = self.face if self.kind == "faces" else self.hand
        if detector is not None:
            found = detector.detect(image)
            record["detections"] = len(found)
            if found:
                best = max(found, key=lambda b: (b.x1 - b.x0) * (b.y1 - b.y0))
                crop = square_crop_around(image, best, margin=self.cfg.margin, size=size)
                return [(crop, {"box": [best.x0, best.y0, best.x1, best.y1]})]
            if self.kind == "faces" and self.cfg.require_detection:
                raise Rejected("no face detected")
            if self.kind == "hands":
                raise Rejected("no hand detected")
        side = min(image.size)  # an aligned close-up: the centred square
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
        return [(crop_resize(image, box, size), {"box": list(box), "center_crop": True})]

    def _finish_caption(self, text: str | None) -> tuple[str, bool] | None:
        """Cleaned and truncated caption, or None when nothing is left."""
        cleaned = self.clean(text) if text else ""
        return self.truncate(cleaned) if cleaned else None

    def captions(
        self, path: Path, crops: list[Any], record: dict[str, Any], generated: list[str] | Exception | None
    ) -> list[tuple[str, str, bool] | str]:
        """One ``(caption, source, truncated)`` per crop, or the reason it has none (see :func:`caption_crops`);
        ``generated`` is what the captioner said for these crops in the batch call (or how it failed)."""
        from mole.data.captioner import Precomputed, caption_crops

        out, error = caption_crops(
            crops, captioner=Precomputed(generated) if generated is not None else None, finish=self._finish_caption,
            sidecar=sidecar_caption(path, self.root), default=self.cfg.default_caption,
            every_crop=self.kind == "scenes", label=path.name,
        )  # fmt: skip
        if error:
            record["captioner_error"] = error
        return out

    def _wants_captions(self, path: Path, crops: list[Any]) -> bool:
        return (
            self.captioner is not None
            and bool(crops)
            and (self.kind == "scenes" or sidecar_caption(path, self.root) is None)
        )

    def batch(self, tasks: list[tuple[int, str]]) -> list[InputResult]:
        """Process inputs together so that the captioner sees the crops of all of them in one call (batches of
        ``captioner_batch_size``: one close-up per input would otherwise mean one image per ``generate``)."""
        results: list[InputResult | None] = [None] * len(tasks)
        pending = []
        for i, task in enumerate(tasks):
            steps = self._process(task)
            try:
                pending.append((i, steps, next(steps)))  # runs up to the captioner: the crops it wants captioned
            except StopIteration as stop:
                results[i] = stop.value
        if pending:
            flat = [crop for _, _, crops in pending for crop in crops]
            try:
                said: list[str] | Exception = list(self.captioner.caption(flat)) if self.captioner else []
            except Exception as err:  # every input of the batch falls back, and the manifest says why
                said = err
            start = 0
            for i, steps, crops in pending:
                answer = said if isinstance(said, Exception) else said[start : start + len(crops)]
                start += len(crops)
                try:
                    steps.send(answer)
                    raise RuntimeError("curation step did not finish after its captions")
                except StopIteration as stop:
                    results[i] = stop.value
        return [r for r in results if r is not None]

    def __call__(self, task: tuple[int, str]) -> InputResult:
        return self.batch([task])[0]

    def _process(self, task: tuple[int, str]) -> Generator[list[Any], list[str] | Exception, InputResult]:
        """One input, as a generator: it yields the crops to caption (only when the captioner is wanted), is sent
        the captions (or the captioner's exception), and returns the input's result."""
        from mole.data.filtering import run_filters

        index, source = task
        path = self.root / source
        record: dict[str, Any] = {"source": source, "status": "rejected", "reason": None, "samples": 0}
        # The --sources row goes under its own key: its columns can never touch the record's own fields.
        provenance = dict(self.sources.lookup(path, self.root) or {})
        record["provenance"] = provenance
        record["license"] = str(provenance["license"]) if provenance.get("license") is not None else None
        try:
            check_inside(path, self.root)  # links must lead to a file inside --input
            record["sha256"] = sha256_file(path)
            image = load_image(path, max_pixels=self.cfg.max_pixels, min_side=self.cfg.min_side,
                               max_aspect=self.cfg.max_aspect)  # fmt: skip
            record["width"], record["height"] = image.size
            h = phash(image)
            record["phash"] = f"{h:016x}"
            if (
                self.captioner is None
                and self.cfg.default_caption is None
                and sidecar_caption(path, self.root) is None
            ):
                raise Rejected("no caption (no sidecar, no captioner, no default_caption)")
            attrs = self.attributes.lookup(path, self.root)
            result = InputResult(record, hash=h)
            crop_reasons: Counter[str] = Counter()
            candidates = self.crops(image, record)
            scores_per_crop: list[dict[str, float]] = []
            passed_crops: list[int] = []
            for k, (crop, _) in enumerate(candidates):  # cheap filters first: only survivors are captioned
                passed, scores, reason = run_filters(self.filters, crop)
                scores_per_crop.append(scores)
                if passed:
                    passed_crops.append(k)
                else:
                    crop_reasons[(reason or "filtered").split(" (")[0]] += 1
            to_caption = [candidates[k][0] for k in passed_crops]
            generated = (yield to_caption) if self._wants_captions(path, to_caption) else None
            captions = self.captions(path, to_caption, record, generated)
            captioned = []
            for k, cap in zip(passed_crops, captions, strict=True):
                if isinstance(cap, str):
                    crop_reasons[cap.split(" (")[0]] += 1
                    scores_per_crop[k]["no_caption"] = 1.0
                    record.setdefault("caption_errors", []).append({"crop": k, "reason": cap})
                else:
                    captioned.append((k, cap))
            clip_scores = (
                self.clip([candidates[k][0] for k, _ in captioned], [c[0] for _, c in captioned])
                if self.clip is not None and captioned
                else None
            )
            crop_captions = []
            for j, (k, (caption, origin, truncated)) in enumerate(captioned):
                crop, geometry = candidates[k]
                scores = scores_per_crop[k]
                crop_captions.append({"crop": k, "caption": caption, "caption_source": origin,
                                      "caption_truncated": truncated})  # fmt: skip
                if clip_scores is not None:
                    scores["clip"] = clip_scores[j]
                    if clip_scores[j] < self.cfg.min_clip_score:
                        crop_reasons[f"clip score < {self.cfg.min_clip_score:g}"] += 1
                        continue
                key = f"{index:08d}_{k:03d}"
                meta = {"source": source, "crop": k, **geometry, "scores": scores, "attributes": attrs,
                        "license": record["license"], "caption_source": origin}  # fmt: skip
                result.samples.append((crop, caption, meta, key))
            if crop_captions:  # the photo's caption line: the first crop's (all of them below)
                first = crop_captions[0]
                record.update(caption=first["caption"], caption_source=first["caption_source"],
                              caption_truncated=first["caption_truncated"])  # fmt: skip
            if len(candidates) > 1 or self.captioner is not None:
                record["crop_captions"] = crop_captions
            record["scores"] = scores_per_crop
            record["crops"] = len(candidates)
            record["crops_rejected"] = dict(crop_reasons)
            record["samples"] = len(result.samples)
            if not result.samples:
                top = crop_reasons.most_common(1)[0][0] if crop_reasons else "no crop"
                raise Rejected(f"every crop filtered ({top})" if len(candidates) > 1 else top)
            record["status"], record["reason"] = "kept", None
            return result
        except Rejected as rej:
            record["reason"], record["samples"] = rej.reason, 0
            return InputResult(record)
        except Exception as err:
            logger.exception("%s: unexpected error", source)
            record["reason"] = f"error: {type(err).__name__}: {err}"
            return InputResult(record)


_WORKER: _Worker | None = None
_INIT_ERROR: str | None = None


class WorkerSetupError(ValueError):
    """A worker could not build its filters or models (bad option, missing model file)."""


def _init_worker(*args: Any) -> None:
    global _WORKER, _INIT_ERROR
    import torch

    torch.set_num_threads(1)  # one core per worker process
    try:
        _WORKER = _Worker(*args)
    except Exception as err:  # an initializer that raises makes multiprocessing.Pool respawn workers forever
        _INIT_ERROR = f"{type(err).__name__}: {err}"


def _run(tasks: list[tuple[int, str]]) -> list[InputResult]:
    if _INIT_ERROR is not None or _WORKER is None:  # e.g. a captioner folder that is not a captioner: stop clearly
        raise WorkerSetupError(f"curation worker setup failed: {_INIT_ERROR or 'worker was not initialised'}")
    return _WORKER.batch(tasks)


def _chunk_dir(output: Path, chunk: int) -> Path:
    return output / "chunks" / f"{chunk:06d}"


def _chunk_done(output: Path, chunk: int) -> bool:
    return (_chunk_dir(output, chunk) / "manifest.jsonl").is_file()


def _results(groups: list[list[tuple[int, str]]], workers: int, init: tuple) -> Iterator[InputResult]:
    """Results in input order; each group of inputs is processed together (captioned in one call)."""
    if workers <= 1:
        worker = _Worker(*init)
        for group in groups:
            yield from worker.batch(group)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork after torch and OpenCV threads exist
    with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
        for results in pool.imap(_run, groups, chunksize=1 if len(groups[0] if groups else []) > 1 else 4):
            yield from results


def curate(
    kind: Kind,
    input_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    cfg: CurateConfig | None = None,
    *,
    workers: int | None = None,
    attributes: str | os.PathLike[str] | None = None,
    sources: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Curate a local folder of images into a dataset at ``output``; returns the stats.

    Args:
        kind: ``scenes`` (sliding-window crops), ``faces`` or ``hands`` (close-up crops).
        attributes: Table keyed by file name whose columns go into each sample's metadata.
        sources: Table keyed by file name with license/provenance columns for the manifest.
        overwrite: Start over instead of resuming an interrupted curation in ``output``. Without it, a resumed
            curation must be the same work (inputs, settings, tables; :mod:`mole.data.curate_state`).
        meta: Extra entries for the dataset index's ``meta`` (the tracking run id, for lineage).
    """
    from tqdm.auto import tqdm

    cfg = cfg or CurateConfig()
    root, out = Path(input_dir), Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is an existing file, not a folder")
    if overwrite and out.exists():
        for name in (INDEX_FILE, "manifest.jsonl", "stats.json", STATE_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "chunks", ignore_errors=True)
    elif (out / INDEX_FILE).exists():
        raise FileExistsError(f"{out} already holds a curated dataset; pass overwrite to redo it")
    inputs = [p.relative_to(root).as_posix() for p in list_images(root)]
    if not inputs:
        raise ValueError(f"no images in {root} (looked for {', '.join(sorted({'.jpg', '.png', '.webp'}))}...)")
    attr_table, source_table = read_table(attributes), read_table(sources)
    from mole.data.filtering import build_filters

    build_filters(cfg.filters if cfg.filters is not None else DEFAULT_FILTERS[kind])  # bad options fail here, once
    state = work_state(kind, root, inputs, cfg.model_dump(), {"attributes": attributes, "sources": sources})
    begin(out, state, has_chunks=(out / "chunks").is_dir() and any((out / "chunks").iterdir()))
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    per = cfg.inputs_per_shard
    chunks = [(c, list(enumerate(inputs))[c * per : (c + 1) * per]) for c in range((len(inputs) + per - 1) // per)]
    dedup = Deduplicator(cfg.dedup_distance) if cfg.dedup_distance is not None else None
    todo = [(c, tasks) for c, tasks in chunks if not _chunk_done(out, c)]
    logger.info("%s: %d inputs in %d chunks, %d to do, %d workers", root, len(inputs), len(chunks), len(todo), workers)

    init = (kind, cfg, str(root), attr_table, source_table)
    bar = tqdm(total=len(inputs), disable=not progress, desc=f"curate {kind}", unit="img")
    done_chunks = {c for c, _ in chunks} - {c for c, _ in todo}
    for c, _ in chunks:  # seed the de-duplication with finished chunks, in input order
        if c in done_chunks and dedup is not None:
            for rec in _read_manifest(_chunk_dir(out, c)):
                if rec["status"] == "kept" and rec.get("phash"):
                    dedup.check(int(rec["phash"], 16), rec["source"])
    bar.update(sum(len(t) for c, t in chunks if c in done_chunks))
    size = cfg.captioner_batch_size if cfg.captioner else 1  # groups stay within a chunk: resumes see the same
    groups = [tasks[i : i + size] for _, tasks in todo for i in range(0, len(tasks), size)]
    results = _results(groups, workers, init)
    for c, tasks in todo:
        _write_chunk(out, c, kind, cfg, (next(results) for _ in tasks), dedup, bar)
    bar.close()
    return _finish(out, kind, cfg, [c for c, _ in chunks], len(inputs), meta or {})


def _read_manifest(folder: Path) -> Iterator[dict[str, Any]]:
    with (folder / "manifest.jsonl").open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _write_chunk(out: Path, chunk: int, kind: Kind, cfg: CurateConfig, results, dedup, bar) -> None:
    folder = _chunk_dir(out, chunk)
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished chunk from an interrupted run
    records = []
    with ShardWriter(folder, name=f"chunk-{chunk}", kind=kind, samples_per_shard=10**9,
                     image_format=cfg.image_format, created_by="mole curate") as writer:  # fmt: skip
        for result in results:
            rec = result.record
            if rec["status"] == "kept" and dedup is not None and result.hash is not None:
                original = dedup.check(result.hash, rec["source"])
                if original is not None:
                    rec.update(status="rejected", reason=f"duplicate of {original}", samples=0)
            if rec["status"] == "kept":
                for image, caption, meta, key in result.samples:
                    writer.write(image, caption, meta, key=key)
            records.append(rec)
            bar.update(1)
    # Last: marks the chunk complete.
    atomic.write_text(folder / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _finish(
    out: Path, kind: Kind, cfg: CurateConfig, chunk_ids: list[int], n_inputs: int, extra: dict[str, Any]
) -> dict[str, Any]:
    shards: list[ShardInfo] = []
    reasons: Counter[str] = Counter()
    status: Counter[str] = Counter()
    samples = 0
    crop_reasons: Counter[str] = Counter()
    with atomic.replaced(out / "manifest.jsonl") as tmp, tmp.open("w", encoding="utf-8") as manifest:
        for c in chunk_ids:
            folder = _chunk_dir(out, c)
            for rec in _read_manifest(folder):
                manifest.write(json.dumps(rec, ensure_ascii=False) + "\n")
                status[rec["status"]] += 1
                if rec["status"] == "rejected":
                    reasons[_reason_key(rec["reason"])] += 1
                samples += rec["samples"]
                crop_reasons.update(rec.get("crops_rejected") or {})
            index = read_index_lenient(folder)
            for shard in index.shards if index else []:
                shards.append(ShardInfo(f"chunks/{c:06d}/{shard.path}", shard.num_samples, shard.sha256))
    if set(status) - {"kept", "rejected"} or status["kept"] + status["rejected"] != n_inputs:
        raise RuntimeError(f"{out}: the manifest accounts for {dict(status)} of {n_inputs} inputs")
    stats = {
        "inputs": n_inputs,
        "kept": status["kept"],
        "rejected": status["rejected"],
        "samples": samples,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "crops_rejected_by_reason": dict(sorted(crop_reasons.items())),
        "config": cfg.model_dump(),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    stats["digest"] = compute_digest([s.sha256 for s in shards])
    index = DatasetIndex(
        name=f"curated-{kind}", kind=kind, num_samples=samples, shards=shards,
        digest=compute_digest([s.sha256 for s in shards]), created_by="mole curate",
        meta={"inputs": n_inputs, "kept": status["kept"], "rejected": status["rejected"], **extra},
    )  # fmt: skip
    from dataclasses import asdict

    atomic.write_json(out / INDEX_FILE, asdict(index), ensure_ascii=False)  # last: the dataset is complete
    logger.info("curated %s: %d inputs, %d kept, %d rejected, %d samples", out, n_inputs, status["kept"],
                status["rejected"], samples)  # fmt: skip
    return stats


def _reason_key(reason: str | None) -> str:
    """Group reasons for the stats: drop the per-input details in parentheses and after "of"."""
    text = (reason or "unknown").split(" (")[0]
    return "duplicate" if text.startswith("duplicate of") else text


def read_index_lenient(folder: Path) -> DatasetIndex | None:
    """A chunk's index, or None for a chunk that kept nothing (an empty index is valid for a chunk)."""
    if not (folder / INDEX_FILE).is_file():
        return None
    raw = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    if not raw.get("shards"):
        return None
    return read_index(folder)


def curate_tracked(
    kind: Kind, input_uri: str, output: str, local_input: str | os.PathLike[str], cfg: CurateConfig, **kw: Any
) -> dict[str, Any]:
    """:func:`curate` into ``output`` (staged and uploaded when it is ``s3://``) inside a ``curate:<kind>`` MLflow
    run whose id goes into the dataset's index, so that training runs find it (lineage)."""
    from mole import tracking
    from mole.storage import staged_output

    run = tracking.StageRun(f"curate:{kind}") if tracking.enabled() else None
    # The run ends FAILED if anything below raises.
    with run if run is not None else nullcontext(), staged_output(output) as out:
        meta = {"mlflow_run_id": run.run_id} if run else {}
        stats = curate(kind, local_input, out, cfg, meta=meta, **kw)
        if run is not None:
            run.log_params({"kind": kind, "input": input_uri, "output": output, "config": cfg.model_dump()})
            run.log_metrics({k: float(stats[k]) for k in ("inputs", "kept", "rejected", "samples")}, step=0)
            run.log_metrics({f"rejected.{k}": float(v) for k, v in stats["rejected_by_reason"].items()}, step=0)
            run.log_artifact(out / "manifest.jsonl", "curation")
            run.log_artifact(out / "stats.json", "curation")
            run.set_tag("mole.dataset.output", stats["digest"])
    return stats
