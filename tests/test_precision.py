"""The 16-bit training path on CPU: what a GPU run takes under DeepSpeed bf16 (16-bit weights, no autocast)
runs here too, so a dtype bug of the GPU path fails in CI instead of on the first step of a GPU job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mole.train.loop import resolve_precision

REPO = Path(__file__).resolve().parents[1]


def test_bf16_is_honoured_without_cuda_and_fp16_falls_back() -> None:
    # Before: every CPU run fell back to fp32, so no test ever took the bf16 path.
    assert resolve_precision("bf16", cuda=False, deepspeed=True) == "bf16"
    assert resolve_precision("bf16", cuda=False, deepspeed=False) == "bf16"
    assert resolve_precision("fp16", cuda=False, deepspeed=True) == "no"
    assert resolve_precision("fp16", cuda=True, deepspeed=True) == "fp16"
    assert resolve_precision("no", cuda=True, deepspeed=False) == "no"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_weights_take_fp32_latents_and_cached_text(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    """DeepSpeed bf16/fp16 holds 16-bit weights and runs no autocast: fp32 latents, noise and cached text
    states used to reach them (`mat1 and mat2 must have the same dtype`, in the UNet's time embedding)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from mole.train.model import DiffusionModel, diffusion_loss

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    text = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    sched = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    model = DiffusionModel(unet, text, sched, "epsilon").to(dtype)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)  # fp32, as the VAE (or the cache) gives them
    states = torch.randn(2, 77, unet.config.cross_attention_dim)  # fp32 cached text states
    pred, target, _ = model({"latents": latents, "encoder_hidden_states": states})
    assert pred.dtype == dtype and target.dtype == torch.float32  # the target is never rounded
    assert model.compute_dtype == dtype
    loss = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # input_ids through the (16-bit) text encoder work as well.
    pred, _, _ = model({"latents": latents, "input_ids": torch.zeros(2, 77, dtype=torch.long)})
    assert pred.dtype == dtype


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_bf16_on_cpu_trains_every_stage_in_bf16(tiny_model_dir, tmp_path) -> None:
    """Single-process DeepSpeed ZeRO-2 (gloo) with mixed_precision bf16: stage 1, an expert and the gates
    train with bf16 weights (not a silent fp32 fallback), validation images generate, and the results are
    saved in the configured dtype (fp32 by default) and load in diffusers / mole.

    Before the fix every CPU run fell back to fp32 (result: no bf16 weights); with bf16 honoured, the first
    step raised `mat1 and mat2 must have the same dtype`, as on the GPU."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from mole.data.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, "faces", 4, seed=0, size=64)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "MOLE_TRACKING": "off",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
    }  # fmt: skip
    out = tmp_path / "runs"
    # One process per stage (DeepSpeed's end of training tears the process group down), chained as the
    # pipeline chains them.
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(data), "--max-steps", "2"]
    runs = {
        "stage1": ["stage1", "--base", str(tiny_model_dir)],
        "face": ["expert", "--name", "face", "--base", str(out / "stage1" / "model")],
        "gates": ["gates", "--base", str(out / "stage1" / "model"),
                  "--experts", f"face={out / 'face' / 'pytorch_lora_weights.safetensors'}"],
    }  # fmt: skip
    for name, args in runs.items():
        section = {"stage1": "stage1", "face": "experts.face", "gates": "gates"}[name]
        sets = [f"{section}.mixed_precision=bf16", f"{section}.batch_size=2"]
        if name != "stage1":  # stage 1 keeps the recipe's validation prompt: generation in bf16 runs too
            sets.append(f"{section}.validation_prompts=[]")
        else:  # and the speed switches of configs/paper.yaml (channels-last weights break DeepSpeed)
            sets += ["stage1.channels_last=true", "stage1.optimizer.foreach=true"]
        if name == "gates":  # a configured save dtype is honoured; cached fp32 text states meet bf16 layers
            sets += ["gates.save_dtype=bf16", "gates.cache_text=true"]
        if name == "face":  # latents cached on disk (fp16, both orientations: random flips kept) meet bf16 layers
            sets += ["experts.face.cache_latents=true", "experts.face.random_flip=true",
                     "experts.face.latent_cache_dir=latent-cache"]  # fmt: skip
        cmd = [sys.executable, "-m", "mole", "train", *args, *common, "--output", str(out / name)]
        cmd += [item for s in sets for item in ("--set", s)]
        env["MASTER_PORT"] = str(_free_port())
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, name + proc.stdout[-3000:] + proc.stderr[-5000:]
    for stage in ("stage1", "face", "gates"):
        result = json.loads((out / stage / "result.json").read_text())
        assert result["zero_stage"] == 2, stage
        assert result["mixed_precision"] == "bf16" and result["compute_dtype"] == "bfloat16", (stage, result)
        assert result["save_dtype"] == ("bf16" if stage == "gates" else "fp32")
        assert torch.isfinite(torch.tensor(result["final_loss"])), stage
    (cache,) = (out / "face" / "latent-cache").iterdir()  # relative: inside the stage's output
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dtype"] == "float16" and meta["shape"][:2] == [4, 2]
    assert meta["inputs"]["vae"]["dtype"] == "torch.bfloat16"  # the VAE encoded in the training precision
    # Saved in fp32 (the documented default), and they load and run.
    pipe = StableDiffusionPipeline.from_pretrained(out / "stage1" / "model")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert list((out / "stage1" / "validation").glob("*.png"))
    saved = {"face/pytorch_lora_weights.safetensors": torch.float32, "gates/gates.safetensors": torch.bfloat16}
    for path, dtype in saved.items():
        tensors = load_file(out / path)
        assert tensors and {t.dtype for t in tensors.values()} == {dtype}, path
    from mole import apply_mole, load_gates

    apply_mole(pipe.unet, {"face": out / "face" / "pytorch_lora_weights.safetensors"}, gate="both")
    load_gates(pipe.unet, out / "gates" / "gates.safetensors")
    image = pipe("a face", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and not (image != image).any()
