"""The GPU path (``pytest -m gpu``, run by ``make gpu-check``): the three stages on a small SD-shaped model
(SD1.5's block layout at narrow widths) in bf16 and fp16 — plain autocast and DeepSpeed ZeRO-2 — and
generation with MoLE in bf16/fp16. Skipped without CUDA; the CPU suite covers the same dtype path under
DeepSpeed bf16 (tests/test_precision.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def small_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.gpu_stage1 import write_model

    return write_model(tmp_path_factory.mktemp("small-sd") / "model", size="small")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mole.data.synthetic import write_dataset

    path = tmp_path_factory.mktemp("faces") / "data"
    write_dataset(path, "faces", 8, seed=0, size=64)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_three_stages(model: Path, data: Path, out: Path, precision: str, deepspeed: bool) -> dict[str, dict]:
    """stage 1 → expert → gates on ``model``, each through the CLI in its own process (single-process
    DeepSpeed ZeRO-2 when ``deepspeed``); their result.json files."""
    env = {**os.environ, "MOLE_TRACKING": "off", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")])),
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}  # fmt: skip
    if deepspeed:
        env.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "RANK": "0",
                    "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1"})  # fmt: skip
    expert = out / "face" / "pytorch_lora_weights.safetensors"
    runs = {
        "stage1": (["stage1", "--base", str(model)], "stage1"),
        "face": (["expert", "--name", "face", "--base", str(out / "stage1" / "model")], "experts.face"),
        "gates": (["gates", "--base", str(out / "stage1" / "model"), "--experts", f"face={expert}",
                   "--experts", f"hand={expert}"], "gates"),
    }  # fmt: skip
    results = {}
    for name, (args, section) in runs.items():
        cmd = [sys.executable, "-m", "mole", "train", *args, "--config", str(REPO / "configs" / "paper.yaml"),
               "--data", str(data), "--output", str(out / name), "--max-steps", "3"]  # fmt: skip
        for item in ("model.resolution=64", f"{section}.mixed_precision={precision}", f"{section}.batch_size=2",
                     f"{section}.validation_prompts=[]", f"{section}.num_workers=0", f"{section}.rank=8"
                     if section == "experts.face" else f"{section}.log_every=1"):  # fmt: skip
            cmd += ["--set", item]
        env["MASTER_PORT"] = str(_free_port())
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{name} ({precision}, deepspeed={deepspeed}):\n{proc.stderr[-5000:]}")
        results[name] = json.loads((out / name / "result.json").read_text())
    return results


@pytest.mark.parametrize(
    "precision,deepspeed", [("bf16", False), ("bf16", True), ("fp16", True)], ids=["bf16-autocast", "bf16-zero2",
                                                                                   "fp16-zero2"]
)  # fmt: skip
def test_three_stages_train_in_16_bits_on_the_gpu(small_sd, faces, tmp_path, precision, deepspeed) -> None:
    results = train_three_stages(small_sd, faces, tmp_path, precision, deepspeed)
    weights = {"bf16": "bfloat16", "fp16": "float16"}[precision] if deepspeed else "float32"  # autocast: fp32
    for name, result in results.items():
        assert result["mixed_precision"] == precision, name
        assert result["compute_dtype"] == weights, name
        assert torch.isfinite(torch.tensor(result["final_loss"])), name
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "stage1" / "model")
    assert pipe.unet.dtype == torch.float32  # save_dtype fp32 by default


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generation_with_mole_in_16_bits(small_sd, write_small_expert, tmp_path, dtype) -> None:
    from mole import apply_mole, save_gates
    from mole.generate import generate, load_pipeline

    face, hand = write_small_expert("face", 1), write_small_expert("hand", 2)
    pipe = load_pipeline(small_sd, device="cpu")
    apply_mole(pipe.unet, {"face": face, "hand": hand}, gate="both")
    gates = save_gates(pipe.unet, tmp_path / "gates.safetensors")
    pipe = load_pipeline(small_sd, experts={"face": face, "hand": hand}, gates=gates, device="cuda", dtype=dtype)
    assert pipe.unet.dtype == dtype
    out = generate(pipe, ["a smiling woman waving"], steps=3, guidance=7.5, num_images=2, record=True)
    for image in out.images:
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
        assert pixels.std() > 0  # not a blank (NaN-decoded) image


@pytest.fixture
def write_small_expert(small_sd: Path, tmp_path: Path):
    """A random LoRA expert for the small SD model, written as diffusers' training scripts write one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from tests.conftest import make_peft_expert

    def _write(name: str, seed: int) -> Path:
        unet = UNet2DConditionModel.from_pretrained(small_sd, subfolder="unet")
        state = make_peft_expert(unet, name, 4, 4.0, seed)
        out = tmp_path / f"expert-{name}"
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=state, unet_lora_adapter_metadata=unet.peft_config[name].to_dict()
        )
        return out / "pytorch_lora_weights.safetensors"

    return _write
