"""Shared fixtures: the tiny model on disk and LoRA experts written by peft/diffusers themselves."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MOLE_TRACKING", "off")  # tests that track start their own MLflow server

# Real servers as session fixtures: SeaweedFS (S3) and an MLflow server whose artifacts go to it.
pytest_plugins = ["tests.s3server", "tests.mlflow_server"]

#: The LoRA targets of the experts in these tests: attention, feed-forward and the 1×1 conv projections.
EXPERT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(autouse=True)
def _mlflow_globals_do_not_outlive_a_test() -> Iterator[None]:
    """mlflow keeps the tracking URI and the active experiment in module globals, and the global URI beats
    MLFLOW_TRACKING_URI: a test that tracked into its own store would otherwise send the next test's direct
    MlflowClient() calls there after monkeypatch restored the variable."""
    yield
    import sys

    if "mlflow" not in sys.modules:
        return
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_uri = None
    if hasattr(registry_utils, "_registry_uri"):
        registry_utils._registry_uri = None
    fluent._active_experiment_id = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, written once per session."""
    from mole.tiny import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def tiny_unet(tiny_model_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()


def unet_inputs(unet, batch: int = 2, height: int = 8, width: int = 8, seed: int = 0) -> dict:
    """A fixed UNet input: noisy latents, timesteps and text states. Non-square when height != width."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, unet.config.in_channels, height, width, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g),
    }


def make_peft_expert(
    unet,
    name: str,
    rank: int,
    alpha: float,
    seed: int,
    targets: list[str] | None = None,
    zero_b: bool = False,
) -> dict[str, torch.Tensor]:
    """Add a peft LoRA adapter to ``unet`` with random A and B; return its raw peft state dict.

    The adapter is left on ``unet`` (callers that need a clean UNet reload one).
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or EXPERT_TARGETS, init_lora_weights=True)
    unet.add_adapter(config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in unet.named_parameters():
            if f".{name}." in pname and ("lora_A" in pname or "lora_B" in pname):
                if "lora_B" in pname and zero_b:
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return {k: v.clone() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


@pytest.fixture
def write_expert(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """Write an expert the way diffusers' training scripts do: ``save_lora_weights`` with its LoRA config."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    def _write(name: str, rank: int = 4, alpha: float = 8.0, seed: int = 1, **kw) -> Path:
        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
        state = make_peft_expert(unet, name, rank, alpha, seed, **kw)
        out = tmp_path / f"expert-{name}"
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=state, unet_lora_adapter_metadata=unet.peft_config[name].to_dict()
        )
        return out / "pytorch_lora_weights.safetensors"

    return _write
