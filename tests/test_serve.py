"""`mole serve` on the tiny MoLE model, on loopback: images, modes, validation, the bounded queue, timeouts,
readiness, metrics and graceful shutdown."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import unet_inputs
from tests.serve_helpers import ServerThread, build_tiny_mole, serve

from mole.generate import generate, load_pipeline
from mole.inject import apply_mole, apply_mole_from_gates, mole_layers, mole_mode, set_mole_mode
from mole.serve import Service, ServiceSettings

FAST = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def mole_files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    return build_tiny_mole(tiny_model_dir, tmp_path_factory.mktemp("serve-mole"))


@pytest.fixture(scope="module")
def mole_pipe(tiny_model_dir: Path, mole_files):
    experts, gates = mole_files
    return load_pipeline(tiny_model_dir, experts, gates, device="cpu")


@pytest.fixture(scope="module")
def server(mole_pipe):
    with serve(mole_pipe) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread):
    with server.client() as c:
        yield c


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- the mode switch the service relies on ---------------------------------------------------------------------


def test_mole_mode_switches_layers_in_place(tiny_model_dir: Path, mole_files) -> None:
    from diffusers import UNet2DConditionModel

    def fresh():
        return UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()

    experts, gates = mole_files
    inputs = unet_inputs(fresh())
    with torch.no_grad():
        base_out = fresh()(**inputs).sample
        fixed = apply_mole(fresh(), experts, gate="none")(**inputs).sample  # every expert at weight 1
        unet = apply_mole_from_gates(fresh(), experts, gates)
        mole_out = unet(**inputs).sample
        with mole_mode(unet, "base"):
            assert torch.equal(unet(**inputs).sample, base_out)
        with mole_mode(unet, "experts"):
            assert torch.allclose(unet(**inputs).sample, fixed, atol=1e-6)
        assert torch.equal(unet(**inputs).sample, mole_out)  # the previous mode is back
    assert not torch.allclose(mole_out, fixed, atol=1e-4) and not torch.allclose(mole_out, base_out, atol=1e-4)
    assert {layer.mode for layer in mole_layers(unet).values()} == {"mole"}
    with pytest.raises(ValueError, match="must be one of"):
        set_mole_mode(unet, "half")
    with pytest.raises(ValueError, match="has none"):
        set_mole_mode(fresh(), "experts")


# --- images ---------------------------------------------------------------------------------------------------------


def test_valid_request_returns_png_of_the_asked_size(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"prompt": "a smiling woman", "steps": 2, "width": 96, "height": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "mole" and body["width"] == 96 and body["height"] == 64
    image = _image(body["images"][0]["png_base64"])
    assert image.format == "PNG" and image.size == (96, 64)

    r = client.post("/v1/generate", json={"prompt": "a hand", **FAST}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert r.headers["x-mole-mode"] == "mole" and r.headers["x-mole-seed"] == "0"

    r = client.post("/v1/generate", json={"prompt": "a hand", "num_images": 2, "seed": 7, **FAST})
    assert [im["seed"] for im in r.json()["images"]] == [7, 8]


def test_same_seed_same_image_and_modes_match_separately_loaded_models(
    client: httpx.Client, tiny_model_dir: Path, mole_files, mole_pipe
) -> None:
    req = {"prompt": "a close-up photo of a smiling woman", "seed": 11, "steps": 3, "guidance": 5.0}
    images = {}
    for mode in ("base", "experts", "mole"):
        first = client.post("/v1/generate", json={**req, "mode": mode}).json()["images"][0]["png_base64"]
        again = client.post("/v1/generate", json={**req, "mode": mode}).json()["images"][0]["png_base64"]
        assert first == again, f"mode {mode}: the same seed gave a different image"
        images[mode] = _pixels(_image(first))
    other = client.post("/v1/generate", json={**req, "seed": 12, "mode": "mole"}).json()["images"][0]["png_base64"]
    assert np.abs(_pixels(_image(other)) - images["mole"]).max() > 10

    # Each mode of the one loaded pipeline equals the model it stands for, loaded on its own.
    experts, _gates = mole_files
    kwargs = {"seed": 11, "steps": 3, "guidance": 5.0}
    reference = {
        "base": load_pipeline(tiny_model_dir, device="cpu"),
        "experts": load_pipeline(tiny_model_dir, experts, device="cpu"),  # fixed scale 1, no gates
    }
    for mode, pipe in reference.items():
        expected = _pixels(generate(pipe, [req["prompt"]], **kwargs).images[0])
        assert np.abs(expected - images[mode]).max() <= 1, mode
    assert np.abs(images["mole"] - images["base"]).max() > 10
    assert np.abs(images["mole"] - images["experts"]).max() > 10
    assert {layer.mode for layer in mole_layers(mole_pipe.unet).values()} <= {"base", "experts", "mole"}


def test_gate_values_come_with_the_mole_image(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"prompt": "a face", "return_gates": True, **FAST})
    gates = r.json()["gates"]
    assert gates["experts"] == ["face", "hand"]
    assert len(gates["global"]) == FAST["steps"] and len(gates["local"]) == FAST["steps"]
    face, hand = gates["global"][0]
    assert face == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))), abs=1e-4)
    assert hand == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0))), abs=1e-4)
    assert client.post("/v1/generate", json={"prompt": "a face", **FAST}).json()["gates"] is None


def test_concurrent_requests_in_different_modes_each_get_their_own_image(mole_pipe, client: httpx.Client) -> None:
    req = {"prompt": "two people walking in a park", "seed": 3, "steps": 3}
    modes = ("base", "experts", "mole")
    expected = {}
    for m in modes:
        expected[m] = client.post("/v1/generate", json={**req, "mode": m}).json()["images"][0]["png_base64"]
    assert len(set(expected.values())) == 3
    order = ["mole", "base", "mole", "experts", "base", "experts", "mole", "base"]
    got: list[tuple[str, str]] = []
    with serve(mole_pipe, concurrency=2, max_queue=8) as s:
        barrier = threading.Barrier(len(order))

        def shoot(mode: str) -> None:
            with s.client() as c:
                barrier.wait()
                r = c.post("/v1/generate", json={**req, "mode": mode, "return_gates": mode == "mole"})
                got.append((mode, r.json()["images"][0]["png_base64"]))

        threads = [threading.Thread(target=shoot, args=(m,)) for m in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(m for m, _ in got) == sorted(order)
    for mode, png in got:
        assert png == expected[mode], f"a concurrent {mode} request got another mode's image"


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("prompt", "   "),
        ("prompt", "a very long prompt " * 40),  # far over 77 CLIP tokens
        ("prompt", "x" * 3000),  # refused before it reaches the tokenizer
        ("prompt", 42),
        ("negative_prompt", "blurry " * 80),
        ("seed", -1),
        ("seed", 2**40),
        ("seed", "abc"),
        ("steps", 0),
        ("steps", 101),
        ("steps", 2.5),
        ("guidance", -0.5),
        ("guidance", 31),
        ("width", 65),
        ("width", 56),
        ("width", 2048),
        ("height", 100),
        ("height", 0),
        ("num_images", 0),
        ("num_images", 5),
        ("mode", "turbo"),
        ("return_gates", "perhaps"),
        ("colour", "red"),  # unknown fields are refused, not ignored
    ],
)
def test_each_invalid_field_gives_422_naming_it(client: httpx.Client, field: str, value: object) -> None:
    body = {"prompt": "a smiling woman", **FAST, field: value}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    message = r.json()["message"]
    assert message.startswith(f"{field}:") or f"; {field}:" in message, message
    assert any(err["loc"][-1] == field for err in r.json()["detail"])


def test_other_invalid_requests_give_422(client: httpx.Client) -> None:
    r = client.post("/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["message"]
    assert client.post("/v1/generate", json={"steps": 2}).json()["message"].startswith("prompt:")
    r = client.post("/v1/generate", json={"prompt": "x", "mode": "base", "return_gates": True, **FAST})
    assert r.status_code == 422 and r.json()["message"].startswith("return_gates:")
    r = client.post("/v1/generate", json={"prompt": "x", "num_images": 2, **FAST}, headers={"Accept": "image/png"})
    assert r.status_code == 422 and r.json()["message"].startswith("num_images:")


def test_a_model_without_experts_serves_base_only(tiny_model_dir: Path) -> None:
    with serve(load_pipeline(tiny_model_dir, device="cpu")) as s, s.client() as c:
        assert c.get("/readyz").json()["modes"] == ["base"]
        r = c.post("/v1/generate", json={"prompt": "a face", **FAST})
        assert r.status_code == 200 and r.json()["mode"] == "base"
        for mode in ("experts", "mole"):
            r = c.post("/v1/generate", json={"prompt": "a face", "mode": mode, **FAST})
            assert r.status_code == 422 and r.json()["message"].startswith("mode:")
            assert "serves base" in r.json()["message"]


# --- load ----------------------------------------------------------------------------------------------------------


def test_a_burst_beyond_the_queue_gets_429_and_every_accepted_request_completes(mole_pipe) -> None:
    n, capacity = 12, 1 + 2
    results: list[httpx.Response | BaseException] = [None] * n  # type: ignore[list-item]
    with serve(mole_pipe, concurrency=1, max_queue=2) as s:
        barrier = threading.Barrier(n)

        def shoot(i: int) -> None:
            with s.client() as c:
                barrier.wait()
                try:
                    results[i] = c.post("/v1/generate", json={"prompt": "a man waving", "seed": i, "steps": 12})
                except BaseException as err:
                    results[i] = err

        threads = [threading.Thread(target=shoot, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        healthy = []
        with s.client(timeout=5) as c:
            while any(t.is_alive() for t in threads):
                healthy.append(c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200)
                time.sleep(0.05)
            for t in threads:
                t.join()
            metrics = c.get("/metrics").text
            after = c.post("/v1/generate", json={"prompt": "after the burst", **FAST})
    assert all(isinstance(r, httpx.Response) for r in results), results
    codes = [r.status_code for r in results]
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) + len(refused) == n, codes
    assert capacity <= len(ok) < n and refused, codes
    for r in ok:
        assert _image(r.json()["images"][0]["png_base64"]).size == (64, 64)
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["message"]
    assert healthy and all(healthy)
    assert after.status_code == 200
    assert f'mole_requests_total{{mode="mole",status="429"}} {len(refused)}.0' in metrics
    assert f'mole_images_generated_total{{mode="mole"}} {len(ok)}.0' in metrics
    assert "mole_queue_depth 0.0" in metrics and "mole_requests_in_flight 0.0" in metrics


def test_a_request_over_its_timeout_gets_504_and_its_generation_stops(mole_pipe) -> None:
    with serve(mole_pipe, request_timeout=1.5) as s, s.client() as c:
        started = time.monotonic()
        r = c.post("/v1/generate", json={"prompt": "a slow one", "steps": 100, "width": 128, "height": 128})
        assert r.status_code == 504 and "1.5 s" in r.json()["message"]
        assert time.monotonic() - started < 5
        # The stopped generation frees its worker at its next step: a short request fits in the timeout.
        r = c.post("/v1/generate", json={"prompt": "a quick one", **FAST})
        assert r.status_code == 200, r.text
        assert 'mole_requests_total{mode="mole",status="504"} 1.0' in c.get("/metrics").text


# --- health, readiness, metrics ---------------------------------------------------------------------------------


def test_readyz_waits_for_the_model_while_healthz_answers(mole_pipe) -> None:
    release = threading.Event()

    def slow_loader():
        release.wait(60)
        return mole_pipe

    service = Service(slow_loader, ServiceSettings(), description="slow")
    with ServerThread(service, wait_ready=False) as s, s.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["status"] == "loading"
        r = c.post("/v1/generate", json={"prompt": "too early", **FAST})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "mole_model_ready 0.0" in c.get("/metrics").text
        release.set()
        assert service.wait_loaded(30)
        assert c.get("/readyz").json() == {"status": "ready", "modes": ["base", "experts", "mole"]}
        assert "mole_model_ready 1.0" in c.get("/metrics").text


def test_a_failed_load_is_reported_without_secrets(mole_pipe) -> None:
    def broken():
        raise OSError("cannot reach https://alice:s3cret@mlflow.example.com/api?X-Amz-Signature=abc123")

    service = Service(broken, ServiceSettings())
    with ServerThread(service, wait_ready=False) as s, s.client() as c:
        assert not service.wait_loaded(30)
        body = c.get("/readyz").json()
        assert c.get("/readyz").status_code == 503 and body["status"] == "failed"
        assert "s3cret" not in body["error"] and "abc123" not in body["error"]
        assert "mlflow.example.com" in body["error"]


def test_metrics_and_info(client: httpx.Client) -> None:
    client.post("/v1/generate", json={"prompt": "counted", "mode": "base", **FAST})
    client.post("/v1/generate", json={"prompt": "counted", "steps": 0})
    text = client.get("/metrics").text
    for name in ("mole_requests_total", "mole_request_latency_seconds_bucket", "mole_queue_depth",
                 "mole_requests_in_flight", "mole_images_generated_total", "mole_model_ready"):  # fmt: skip
        assert name in text, name
    assert 'mole_requests_total{mode="none",status="422"}' in text  # refused before the body was read
    assert 'mole_request_latency_seconds_count{mode="base"}' in text
    info = client.get("/v1/info").json()
    assert info["modes"] == ["base", "experts", "mole"] and info["experts"] == ["face", "hand"]
    assert info["native_size"] == 64 and info["gate"] == "both"
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text


@pytest.mark.slow
def test_serves_a_registered_model_by_its_alias(tiny_model_dir: Path, mole_files, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mole import tracking
    from mole.serve import make_loader

    # A registry of its own (sqlite + local artifacts), so that the aliases of other tests' servers stay put.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mole-serve-test")
    monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
    mlflow.create_experiment("mole-serve-test", artifact_location=(tmp_path / "artifacts").as_uri())
    experts, gates = mole_files
    with tracking.StageRun("gates") as run:
        run.register_mole(tiny_model_dir, experts, gates, alias="champion")
    loader = make_loader("models:/mole@champion", device="cpu")
    service = Service(loader, ServiceSettings(), description="models:/mole@champion")
    with ServerThread(service) as s, s.client() as c:
        assert c.get("/readyz").json()["modes"] == ["base", "experts", "mole"]
        r = c.post("/v1/generate", json={"prompt": "a face", "return_gates": True, **FAST})
        assert r.status_code == 200 and r.json()["gates"]["experts"] == ["face", "hand"]
        info = c.get("/v1/info").json()
        assert info["model"] == "models:/mole@champion" and info["model_version"] == "models:/mole/1"


# --- the command ----------------------------------------------------------------------------------------------------


def test_serve_command_refuses_bad_arguments(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from mole.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no model_index.json" in result.output
    result = runner.invoke(app, ["serve", "--model", str(tiny_model_dir), "--gates", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 2 and "--experts" in result.output
    result = runner.invoke(app, ["serve", "--model", "models:/mole@champion", "--experts", "a=b"])
    assert result.exit_code == 2 and "registered" in result.output
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--max-queue" in result.output and "--concurrency" in result.output


@pytest.mark.slow
def test_mole_serve_finishes_requests_in_flight_on_sigterm(tiny_model_dir: Path, mole_files) -> None:
    experts, gates = mole_files
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mole", "serve", "--model", str(tiny_model_dir), "--gates", str(gates),
           "--port", str(port), "--device", "cpu", "--shutdown-timeout", "60"]  # fmt: skip
    for name, path in experts.items():
        cmd += ["--experts", f"{name}={path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "mole serve did not become ready in 120 s"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        answer: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answer.append(
                httpx.post(f"{url}/v1/generate", json={"prompt": "in flight", "steps": 60}, timeout=120)
            )
        )
        slow.start()
        while "mole_requests_in_flight 1.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
            assert slow.is_alive()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        slow.join(120)
        assert answer and answer[0].status_code == 200, answer
        # uvicorn drains, then re-raises the signal it caught: the process ends "killed by SIGTERM", as expected.
        assert proc.wait(60) == -signal.SIGTERM
        assert _image(answer[0].json()["images"][0]["png_base64"]).size == (64, 64)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "in flight" not in log  # prompts stay out of the logs
