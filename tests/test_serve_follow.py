"""A service started from a registry alias notices when the alias moves, and says so by exiting for a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mole.serve.follow import AliasFollower


class FakeLoader:
    """Answers ``moved()`` from a script: None (unchanged), an exception (registry down), then a new version."""

    def __init__(self, answers: list) -> None:
        self.answers, self.calls = answers, 0

    def moved(self) -> str | None:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_the_follower_reports_a_moved_alias_once_and_survives_registry_errors() -> None:
    seen: list[str] = []
    done = threading.Event()
    loader = FakeLoader([None, ConnectionError("registry down"), None, "models:/mole/8"])
    follower = AliasFollower(loader, 0.01, lambda v: (seen.append(v), done.set())).start()
    assert done.wait(5)
    follower.thread.join(5)
    assert seen == ["models:/mole/8"] and loader.calls == 4 and not follower.thread.is_alive()
    idle = AliasFollower(FakeLoader([None]), 0.01, seen.append).start()
    time.sleep(0.1)
    idle.stop()
    idle.thread.join(5)
    assert not idle.thread.is_alive() and seen == ["models:/mole/8"]
    with pytest.raises(ValueError, match="positive"):
        AliasFollower(FakeLoader([None]), 0, seen.append)


@pytest.mark.slow
def test_a_registered_loader_sees_its_alias_move(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from tests.serve_helpers import build_tiny_mole

    from mole import tracking
    from mole.serve import make_loader

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "follow")
    monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
    mlflow.create_experiment("follow", artifact_location=(tmp_path / "artifacts").as_uri())
    experts, gates = build_tiny_mole(tiny_model_dir, tmp_path / "mole")
    with tracking.StageRun("gates") as run:
        first = run.register_mole(tiny_model_dir, experts, gates, alias="champion")
    loader = make_loader("models:/mole@champion", device="cpu")
    assert loader.moved() is None  # nothing loaded yet
    loader()
    assert loader.resolved == first.uri and loader.moved() is None
    with tracking.StageRun("gates") as run:
        second = run.register_mole(tiny_model_dir, experts, gates, alias="champion")
    assert loader.moved() == second.uri == f"models:/mole/{int(first.version) + 1}"


def test_the_server_exits_for_a_restart_when_the_alias_moved(tiny_model_dir: Path) -> None:
    """run_server with follow_alias: the service loads, the alias moves, the server stops and returns 75."""
    import socket

    from mole.serve import make_loader, run_server
    from mole.serve.follow import MOVED_EXIT

    local = make_loader(str(tiny_model_dir), device="cpu")

    class Loader:
        resolved = "models:/mole/1"

        def __call__(self):
            return local()

        def moved(self) -> str | None:
            return "models:/mole/2"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert run_server(Loader(), port=port, follow_alias=0.2, shutdown_timeout=1) == MOVED_EXIT
    assert time.monotonic() - started < 60
