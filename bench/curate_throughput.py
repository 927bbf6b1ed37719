"""Curation throughput per core: ``curate scenes`` on 2048×1365 photos and ``curate faces`` on 1024² close-ups.

Inputs are real photos from scikit-image, resized and saved as JPEG. Scenes: astronaut, coffee, chelsea,
rocket, camera, hubble (mirrored and cropped variants), the paper's 1024 window and 512 output, with its blur
and person filters. Faces: the astronaut's face cropped at several framings and mirrored, 1024×1024 like an
FFHQ/CelebA-HQ close-up (sharpened after upscaling), Haar face detection, a square crop around the face and the
blur filter.

One worker, one torch thread and one OpenCV thread, so the figure is per core. ``images_per_second_per_core``
is images per second of this process's CPU time (what a core delivers, whatever else runs on the machine);
``images_per_wall_second`` is beside it.

    python -m bench.curate_throughput [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from bench.common import update_results

SCENE_SIZE = (2048, 1365)
FACE_SIZE = (1024, 1024)
# Framings of the astronaut's face (source pixels of the 512² photo): close-ups at different zooms.
_FACE_BOXES = [(120, 0, 360, 240), (100, 0, 380, 280), (140, 20, 320, 200), (110, 10, 350, 250)]


def make_scenes(folder: Path, count: int) -> None:
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera(), data.hubble_deep_field()]
    for i in range(count):
        base = Image.fromarray(sources[i % len(sources)]).convert("RGB")
        if (i // len(sources)) % 2:
            base = ImageOps.mirror(base)
        w, h = base.size
        shift = (i // (2 * len(sources))) * 0.05
        base = base.crop((int(w * shift), 0, w, h))
        base.resize(SCENE_SIZE, Image.Resampling.BICUBIC).save(folder / f"photo_{i:03d}.jpg", quality=92)


def make_faces(folder: Path, count: int) -> None:
    from skimage import data

    photo = Image.fromarray(data.astronaut()).convert("RGB")
    for i in range(count):
        face = photo.crop(_FACE_BOXES[i % len(_FACE_BOXES)])
        if (i // len(_FACE_BOXES)) % 2:
            face = ImageOps.mirror(face)
        # Upscaled 4×, then sharpened so that it passes the blur filter as a real 1024² photo would.
        face = face.resize(FACE_SIZE, Image.Resampling.LANCZOS).filter(ImageFilter.UnsharpMask(3, 200, 0))
        face.save(folder / f"face_{i:03d}.jpg", quality=92)


def measure(kind: str, count: int) -> dict[str, Any]:
    from mole.data.curate import CurateConfig, curate

    make = make_scenes if kind == "scenes" else make_faces
    with tempfile.TemporaryDirectory(prefix=f"mole-bench-curate-{kind}-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        raw.mkdir()
        make(raw, count)
        cfg = CurateConfig(default_caption="a photo", dedup_distance=None)  # the paper's 1024 window, 512 output
        wall0, cpu0 = time.perf_counter(), time.process_time()
        stats = curate(kind, raw, out, cfg, workers=1, progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    crops = stats["samples"] + sum(stats.get("crops_rejected_by_reason", {}).values())
    return {
        "images": count,
        "input_size": list(SCENE_SIZE if kind == "scenes" else FACE_SIZE),
        "images_per_second_per_core": count / cpu,
        "images_per_wall_second": count / wall,
        "crops_per_second_per_core": crops / cpu,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "kept": stats["kept"],
        "samples": stats["samples"],
        "rejected_by_reason": stats.get("rejected_by_reason", {}),
        "filters": "blur + person (Haar faces + HOG people)" if kind == "scenes" else "Haar face detection + blur",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images")
    args = parser.parse_args()
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    report = {
        "threads": 1,
        "scenes": measure("scenes", 6 if args.quick else 12),
        "faces": measure("faces", 8 if args.quick else 24),
    }
    update_results("curation", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
