"""The service's hardening: body limit (413), strict types (422), Retry-After from recent latency, 503 at
shutdown instead of a plain-text 500."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from tests.serve_helpers import serve

from mole.serve import Service, ServiceSettings


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path):
    from mole.generate import load_pipeline

    with serve(load_pipeline(tiny_model_dir, device="cpu")) as server, httpx.Client(base_url=server.url) as c:
        yield c


def test_large_body_is_refused_before_it_is_read(client: httpx.Client) -> None:
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    answer = client.post("/v1/generate", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "larger than" in answer.json()["message"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"a" * 65536
        yield b'"}'

    answer = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert client.post("/v1/generate", json={"prompt": "ok", "steps": 1}).status_code == 200


@pytest.mark.parametrize(
    "field, value", [("steps", "2"), ("return_gates", "yes"), ("seed", 1.5), ("num_images", True), ("seed", "7")]
)
def test_types_are_strict(client: httpx.Client, field: str, value: object) -> None:
    answer = client.post("/v1/generate", json={"prompt": "a face", field: value})
    assert answer.status_code == 422 and field in answer.json()["message"], answer.text


def test_retry_after_follows_recent_latency_not_the_first_slow_requests() -> None:
    service = Service(lambda: None, ServiceSettings(concurrency=1, max_queue=8))
    for seconds in (30.0, 25.0, 0.4, 0.4, 0.5, 0.4, 0.45, 0.4, 0.4):  # cold start, then steady
        service._observe(seconds)
    service._accepted = 9  # one running, eight waiting: about 9 × 0.4 s
    assert 3 <= service.retry_after() <= 5


@pytest.mark.slow
def test_requests_past_the_shutdown_timeout_get_503_not_a_traceback(tiny_model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mole", "serve", "--model", str(tiny_model_dir), "--port", str(port),
           "--device", "cpu", "--shutdown-timeout", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "mole serve did not become ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        answer: list[httpx.Response] = []
        body = {"prompt": "too long to finish", "steps": 100, "width": 512, "height": 512}
        slow = threading.Thread(target=lambda: answer.append(httpx.post(f"{url}/v1/generate", json=body, timeout=120)))
        slow.start()
        while "mole_requests_in_flight 1.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
            assert slow.is_alive()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        slow.join(120)
        assert answer and answer[0].status_code == 503, answer and answer[0].text
        assert "shut down" in answer[0].json()["message"]
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
