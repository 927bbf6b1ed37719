"""Shared by the study tests: evaluation-run folders written in `mole evaluate run`'s format (tiny PIL images,
no generation), and a real PostgreSQL server started from Debian's binaries when they are installed."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from mole.evaluate.runner import prompt_seed

PROMPTS = ["a close-up photo of a smiling woman", "a man waving his hand", "a girl holding a red ball"]


def _mean(values: Sequence[object]) -> float:
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return sum(numbers) / max(1, len(numbers))


def write_eval_run(
    folder: Path,
    label: str,
    colour: tuple[int, int, int],
    *,
    prompts: Sequence[str] = PROMPTS,
    seed: int = 0,
    repeats: int = 1,
    scores: dict[str, Sequence[float]] | None = None,
    mlflow_run_id: str | None = None,
) -> Path:
    """An evaluation output as :func:`mole.evaluate.runner.evaluate` writes it: ``report.json``, ``scores.csv``
    and one 16×16 PNG per row (a solid ``colour`` with the row's index drawn into the first pixel)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for repeat in range(repeats):
        for index, prompt in enumerate(prompts):
            path = folder / "images" / f"r{repeat}" / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGB", (16, 16), colour)
            image.putpixel((0, 0), (n % 256, repeat, index))
            image.save(path)
            row = {"repeat": repeat, "index": index, "prompt": prompt, "seed": prompt_seed(seed, repeat, prompt),
                   "image": str(path.relative_to(folder))}  # fmt: skip
            for name, values in (scores or {}).items():
                row[name] = values[n]
            rows.append(row)
            n += 1
    with (folder / "scores.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = {"model": f"/models/{label}", "prompts": "prompts.txt", "num_prompts": len(prompts),
                "repeats": repeats, "seed": seed, "steps": 4, "guidance": 7.5, "width": None,
                "height": None}  # fmt: skip
    report = {"label": label, "settings": settings, "num_prompts": len(prompts), "repeats": repeats,
              "scores": {k: {"mean": _mean(v), "stderr": 0.0} for k, v in (scores or {}).items()}}  # fmt: skip
    if mlflow_run_id:
        report["mlflow_run_id"] = mlflow_run_id
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


# --- PostgreSQL -----------------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (``initdb``, ``postgres``), newest version first."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name),
                         reverse=True):  # fmt: skip
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("postgres") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_postgres(bin_dir: Path) -> Iterator[str]:
    """A throw-away PostgreSQL server on a free loopback port; yields its SQLAlchemy URL, stops it by PID.

    PostgreSQL refuses to run as root, so as root the data folder is given to the ``postgres`` system user
    (Debian's package creates it) and initdb and the server run as that user (``Popen(user=...)``: the child
    drops privileges before exec, so the PID we hold is the server's own).
    """
    root = Path(tempfile.mkdtemp(prefix="mole-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    user: str | None = None
    if os.geteuid() == 0:
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError as err:
            raise RuntimeError("running as root and no `postgres` user to run PostgreSQL as") from err
        user = "postgres"
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chown(sock, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    try:
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, user=user, env=env, cwd=root)  # fmt: skip
        port = _free_port()
        log = (root / "server.log").open("wb")
        proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, user=user, env=env, cwd=root, start_new_session=True,
        )  # fmt: skip
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=2).close()
                break
            except psycopg.OperationalError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start: {log_text}") from err
                time.sleep(0.1)
        try:
            yield url
        finally:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: roll back, close connections, stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class StudyServer:
    """``mole study serve``'s app under uvicorn on a loopback socket bound to port 0, in a thread."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> StudyServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the study server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
