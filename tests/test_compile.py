"""``--compile``: eager with a warning on CPU, eager with a warning when compiling fails, gate recording kept, and the
same images as without it; on a GPU (gpu-marked) the compiled UNet gives the eager images to fp16 tolerance."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mole.cli import app
from mole.compile import CompiledForward, compile_unet
from mole.gates_io import save_gates
from mole.generate import generate, load_pipeline
from mole.inject import apply_mole

runner = CliRunner()


@pytest.fixture
def mole_files(tiny_model_dir: Path, write_expert, tmp_path: Path) -> dict:
    from diffusers import UNet2DConditionModel

    experts = {"face": write_expert("face"), "hand": write_expert("hand", seed=2)}
    unet = apply_mole(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), experts)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".mole_" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return {"experts": experts, "gates": save_gates(unet, tmp_path / "gates.safetensors")}


def _images(pipe, record: bool = False):
    result = generate(pipe, ["a woman waving"], steps=2, seed=3, num_images=2, record=record)
    return np.stack([np.asarray(im) for im in result.images]), result.gate_trace


def test_compile_on_cpu_stays_eager_with_a_warning_and_the_same_images(
    tiny_model_dir: Path, mole_files: dict, tmp_path: Path
) -> None:
    face, hand, gates = mole_files["experts"]["face"], mole_files["experts"]["hand"], mole_files["gates"]
    common = ["generate", "--model", str(tiny_model_dir), "--prompt", "a man", "--steps", "2", "--device", "cpu",
              "--experts", f"face={face}", "--experts", f"hand={hand}", "--gates", str(gates)]  # fmt: skip
    compiled = runner.invoke(app, [*common, "--compile", "--output", str(tmp_path / "c.png")])
    assert compiled.exit_code == 0, compiled.output
    assert "compiling is for CUDA" in " ".join(compiled.output.split())  # the CLI's log, wrapped by rich
    eager = runner.invoke(app, [*common, "--output", str(tmp_path / "e.png")])
    assert eager.exit_code == 0, eager.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "e.png")))


def test_a_failing_compile_falls_back_to_eager_once_with_a_warning(
    tiny_model_dir: Path, mole_files: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = load_pipeline(tiny_model_dir, mole_files["experts"], mole_files["gates"], device="cpu")
    expected, _ = _images(pipe)
    attempts = []

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            attempts.append(kwargs)
            raise RuntimeError("inductor: no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapper = compile_unet(pipe.unet, allow_cpu=True)
    assert isinstance(wrapper, CompiledForward) and isinstance(pipe.unet.forward, CompiledForward)
    assert compile_unet(pipe.unet, allow_cpu=True) is wrapper  # compiling twice wraps once
    with caplog.at_level(logging.WARNING, logger="mole.compile"):
        images, _ = _images(pipe)
    assert np.array_equal(images, expected)
    assert len(attempts) == 1 and attempts[0]["mode"] == "reduce-overhead"  # tried once, then eager for good
    assert "no C++ compiler" in wrapper.failed and wrapper.compiled_calls == 0
    assert sum("running eager from now on" in r.getMessage() for r in caplog.records) == 1


def test_gate_recording_runs_eager_and_the_compiled_path_serves_the_rest(
    tiny_model_dir: Path, mole_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_pipeline(tiny_model_dir, mole_files["experts"], mole_files["gates"], device="cpu")
    expected, expected_trace = _images(pipe, record=True)
    # A stand-in compiler that runs the eager forward and counts: what matters is which path each call takes.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    wrapper = compile_unet(pipe.unet, allow_cpu=True)
    images, trace = _images(pipe, record=True)
    assert wrapper.compiled_calls == 0 and trace.global_ == expected_trace.global_ and len(trace.local) == 2
    assert np.array_equal(images, expected)
    _images(pipe)
    assert wrapper.compiled_calls == 2  # two denoising steps
    assert not any(p.requires_grad for p in pipe.unet.parameters())  # frozen: the stacked weights stay cached


@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_unet_on_cuda_gives_the_eager_images(tiny_model_dir: Path, mole_files: dict) -> None:
    eager = load_pipeline(tiny_model_dir, mole_files["experts"], mole_files["gates"], device="cuda")
    compiled = load_pipeline(tiny_model_dir, mole_files["experts"], mole_files["gates"], device="cuda",
                             compile_unet=True)  # fmt: skip
    expected, _ = _images(eager)
    images, _ = _images(compiled)
    assert compiled.unet.forward.failed is None and compiled.unet.forward.compiled_calls == 2
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 8  # fp16 kernels differ in rounding


def test_serve_and_evaluate_take_compile(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mole.serve import make_loader

    for command in (["serve", "--help"], ["evaluate", "run", "--help"], ["generate", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "--compile" in result.output, command
    seen = []
    monkeypatch.setattr("mole.compile.compile_unet", lambda unet, **kw: seen.append(unet))
    pipe = make_loader(str(tiny_model_dir), compile_unet=True, device="cpu")()
    assert seen == [pipe.unet]  # the service's loader compiles (here a stand-in: on CPU it would stay eager)
    pipe = make_loader(str(tiny_model_dir), device="cpu")()
    assert len(seen) == 1
