"""Real DeepSpeed ZeRO on CPU: two processes under `accelerate launch`, gloo process group."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("deepspeed", reason="install the deepspeed extra: pip install -e '.[deepspeed]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    config: str, out: Path, data: Path, base: Path, steps: int = 3, precision: str = "no", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI missing from the venv"
    env = {
        **os.environ,
        # DeepSpeed compiles CPU ops on first use (30-55 s); keep them for later runs.
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        accelerate, "launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
        "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "-m", "mole", "train", "stage1", "--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(data),
        "--output", str(out), "--base", str(base), "--max-steps", str(steps),
        "--set", "stage1.batch_size=2", "--set", "stage1.checkpoint_every=2", "--set", "stage1.validation_prompts=[]",
        "--set", f"stage1.mixed_precision='{precision}'",  # quoted: YAML reads a bare no as false
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from mole.data.synthetic import write_dataset

    path = tmp_path_factory.mktemp("scenes") / "data"
    write_dataset(path, "scenes", 8, seed=0, size=64)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("config,zero,precision", [("zero2.yaml", 2, "no"), ("zero3.yaml", 3, "bf16")])
def test_deepspeed_two_processes_train_save_and_load(config, zero, precision, scenes, tiny_model_dir, tmp_path):
    """ZeRO-2 in fp32; ZeRO-3 in bf16 (16-bit shards gathered on the main process, saved in fp32)."""
    import torch
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    proc = _launch(config, out, scenes, tiny_model_dir, precision=precision)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2 and result["zero_stage"] == zero and result["steps"] == 3
    assert result["compute_dtype"] == ("bfloat16" if precision == "bf16" else "float32")
    assert StableDiffusionPipeline.from_pretrained(out / "model").unet.dtype == torch.float32
    # The saved model is complete (ZeRO-3 gathered its 16-bit shards) and plain diffusers runs it.
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    image = pipe("two people in a park", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert (out / "checkpoints" / "step-00000002").is_dir()


@pytest.mark.slow
def test_two_processes_build_one_disk_latent_cache_with_flips_and_reuse_it(scenes, tiny_model_dir, tmp_path):
    """Each process encodes its share (rank::2) into the one memmap rank 0 created, between real gloo barriers;
    the resumed run reuses it."""
    import numpy as np

    out = tmp_path / "run"
    cache = ("--set", "stage1.cache_latents=true", "--set", "stage1.random_flip=true",
             "--set", "stage1.latent_cache_dir=latent-cache")  # fmt: skip
    proc = _launch("zero2.yaml", out, scenes, tiny_model_dir, steps=2, extra=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (folder,) = (out / "latent-cache").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shape"] == [8, 2, 4, 8, 8] and meta["usable"] == 8 and meta["dtype"] == "float16"
    mean = np.load(folder / "mean.npy", mmap_mode="r")
    assert mean.dtype == np.float16 and all(np.abs(mean[i]).sum() > 0 for i in range(8))  # both shares written
    assert json.loads((out / "result.json").read_text())["processes"] == 2
    built = {name: (folder / name).stat() for name in ("mean.npy", "std.npy", "meta.json")}
    proc = _launch("zero2.yaml", out, scenes, tiny_model_dir, steps=3, extra=(*cache, "--resume", "latest"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name, stat in built.items():  # reused as it was: not rebuilt, not rewritten
        now = (folder / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert [p.name for p in (out / "latent-cache").iterdir()] == [folder.name]
    assert json.loads((out / "result.json").read_text())["steps"] == 3
