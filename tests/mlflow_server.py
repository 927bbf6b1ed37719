"""A real `mlflow server` for tests: sqlite backend, artifacts proxied to an S3 bucket, loopback only."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    log: Path


@contextlib.contextmanager
def running_mlflow_server(root: Path, s3_env: dict[str, str]) -> Iterator[MlflowServer]:
    """``mlflow server`` on loopback, sqlite under ``root``, artifacts to ``s3://mlflow/artifacts`` at the S3
    endpoint and credentials of ``s3_env``; stopped on exit."""
    port = free_port()
    env = {
        **os.environ,
        **s3_env,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # ~8 s start instead of ~22 s
    }
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert mlflow_bin, "mlflow CLI missing from the venv"
    log = root / "server.log"
    cmd = [
        mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", "s3://mlflow/artifacts", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    try:
        yield MlflowServer(uri, proc, log)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory) -> Iterator[MlflowServer]:
    """``mlflow server`` whose artifacts go to ``s3://mlflow/`` on the SeaweedFS fixture."""
    s3_server.client().create_bucket(Bucket="mlflow")
    s3_env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_env) as server:
        yield server
