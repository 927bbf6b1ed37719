"""The registered ``mole`` model loads where mole is not installed: a fresh virtualenv (no system site-packages,
no checkout on the path) gets only the model's own requirements.txt, then loads the version and generates.

That is what ``mlflow models serve --env-manager virtualenv`` and MLServer do. It proves the environment is
complete: every import the model makes is either in its requirements or in its code path. The only shortcut is
installing torch 2.13.0 first, from this machine's CPU build, so that the pin does not download a CUDA build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.serve_helpers import build_tiny_mole

pytest.importorskip("mlflow")


@pytest.fixture
def registered(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A MoLE version registered as the pipeline registers it, downloaded to a folder."""
    import mlflow

    from mole import tracking

    monkeypatch.setenv("MOLE_TRACKING", "on")
    monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pyfunc-env")
    mlflow.create_experiment("pyfunc-env", artifact_location=(tmp_path / "artifacts").as_uri())
    experts, gates = build_tiny_mole(tiny_model_dir, tmp_path / "mole")
    with tracking.StageRun("gates") as run:
        ref = run.register_mole(tiny_model_dir, experts, gates)
    return Path(mlflow.artifacts.download_artifacts(ref.uri, dst_path=str(tmp_path / "model")))


def test_the_model_declares_its_signature_and_environment(registered: Path) -> None:
    meta = yaml.safe_load((registered / "MLmodel").read_text())
    signature = json.loads(meta["signature"]["inputs"])
    assert {c["name"]: c["type"] for c in signature}["prompt"] == "string"
    assert json.loads(meta["signature"]["outputs"]) == [{"type": "string", "name": "png", "required": True}]
    assert meta["flavors"]["python_function"]["code"] == "code"
    assert (registered / "code" / "mole" / "generate.py").is_file()
    requirements = (registered / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.startswith("mole==")]  # not on PyPI: it travels as code
    assert "torch==2.13.0" in requirements and "diffusers==0.42.1" in requirements


@pytest.mark.slow
def test_the_model_loads_and_generates_in_a_fresh_virtualenv(registered: Path, tmp_path: Path) -> None:
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MLFLOW", "MOLE"))}
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, env=env, timeout=900)
    subprocess.run([*pip, "-r", str(registered / "requirements.txt")], check=True, env=env, timeout=1800)
    script = f"""
import base64, io, json
import mlflow.pyfunc, pandas as pd
from PIL import Image
model = mlflow.pyfunc.load_model({str(registered)!r})
out = model.predict(pd.DataFrame({{"prompt": ["a woman waving"], "steps": [2], "width": [32], "height": [48]}}))
image = Image.open(io.BytesIO(base64.b64decode(out["png"][0])))
import mole
print(json.dumps({{"size": list(image.size), "mole": mole.__file__}}))
"""
    done = subprocess.run([str(py), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["size"] == [32, 48]
    assert result["mole"].startswith(str(registered / "code"))  # mole came with the model, not from a checkout
