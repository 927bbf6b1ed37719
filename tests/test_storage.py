"""mole.storage against a real S3 server (SeaweedFS on loopback): transfers, folders, markers, errors, faults."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests import storage_probes as probes

from mole import storage
from mole.storage import StorageError, StorageNotFoundError

pytest_plugins = ["tests.s3server"]

MiB = 1024 * 1024
TREE = {
    "dataset.json": b'{"format": "mole-shards/1"}',
    "shard-000000.tar": os.urandom(3000),
    "with space/na\u00efve caf\u00e9.txt": "\u00e9t\u00e9 \u2014 \u00fcber".encode(),
    "\u65e5\u672c/\u5199\u771f 1.bin": os.urandom(1500),
    "deep/er/still/empty.txt": b"",
}


@pytest.fixture(autouse=True)
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point mole at the test server; keep a developer's AWS files, profiles and instance roles out of it."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "MOLE_S3_")) or name == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def write_tree(root: Path, tree: dict[str, bytes]) -> Path:
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def record_calls(client, operation: str) -> list[tuple[str, str]]:
    """``("start"|"done", Key)`` for every ``operation`` call on ``client``, in order."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def start(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["test_key"] = params["Key"]
        with lock:
            events.append(("start", params["Key"]))

    def done(context: dict[str, Any], **_: Any) -> None:
        with lock:
            events.append(("done", context["test_key"]))

    client.meta.events.register(f"provide-client-params.s3.{operation}", start)
    client.meta.events.register(f"after-call.s3.{operation}", done)
    return events


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def assert_no_secret(err: BaseException, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    text = "".join(traceback.format_exception(err)) + caplog.text
    for secret in secrets:
        assert secret not in text


# ----------------------------------------------------------------------------------------------- round trips


def test_client_uses_environment_endpoint_and_retry_settings(s3_server, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("MOLE_S3_MAX_ATTEMPTS", "5")
    client = storage.s3_client(read_timeout=7)
    assert client.meta.endpoint_url == s3_server.endpoint_url  # from MLFLOW_S3_ENDPOINT_URL
    assert client.meta.config.retries == {"total_max_attempts": 5, "mode": "standard"}  # 1 try + 4 retries
    assert client.meta.config.read_timeout == 7
    assert client.meta.config.connect_timeout == storage.DEFAULT_CONNECT_TIMEOUT
    monkeypatch.setenv("MOLE_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="MOLE_S3_MAX_ATTEMPTS"):
        storage.s3_client()


def test_file_and_text_round_trip(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/runs/r 1/caf\u00e9.txt"
    assert not probes.exists(uri)
    probes.write_text(uri, "h\u00e9llo\n")
    assert probes.read_text(uri) == "h\u00e9llo\n"
    assert probes.exists(uri)
    assert probes.exists(f"s3://{bucket}/runs")  # a prefix with objects counts as existing
    assert not probes.exists(f"s3://{bucket}/run")  # ...but not a mere string prefix of one

    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(70_000))
    storage.upload_file(src, f"s3://{bucket}/runs/blob.bin")
    dest = storage.download_file(f"s3://{bucket}/runs/blob.bin", tmp_path / "back" / "blob.bin")
    assert dest.read_bytes() == src.read_bytes()
    assert not list(tmp_path.rglob("*.part"))
    assert probes.list_uris(f"s3://{bucket}/runs/") == [f"s3://{bucket}/runs/blob.bin", uri]

    local = tmp_path / "local" / "note.txt"  # the same calls on local paths
    probes.write_text(local, "x")
    assert probes.read_text(local) == "x"
    assert probes.list_uris(tmp_path / "local") == [str(local)]


def test_local_paths_take_the_same_calls(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    dest = tmp_path / "dest"
    assert storage.upload_dir(src, str(dest), marker="dataset.json") == len(TREE)
    assert read_tree(dest) == TREE
    assert storage.download_dir(dest, tmp_path / "again") == tmp_path / "again"
    assert read_tree(tmp_path / "again") == TREE
    storage.upload_file(src / "dataset.json", str(tmp_path / "one" / "d.json"))
    assert probes.exists(tmp_path / "one" / "d.json")
    assert not list(tmp_path.rglob("*.part"))


def test_big_file_goes_multipart_both_ways(bucket: str, s3_server, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    uri = f"s3://{bucket}/big.bin"
    client = storage.s3_client()
    parts = record_calls(client, "UploadPart")
    storage.upload_file(src, uri, client=client, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    etag = s3_server.client().head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # the server assembled 5 + 5 + 2 MiB parts
    assert sum(kind == "done" for kind, _ in parts) == 3
    dest = storage.download_file(uri, tmp_path / "big.out", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_dir_round_trip_uploads_the_marker_last(bucket: str, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    uri = f"s3://{bucket}/datasets/faces v1"
    client = storage.s3_client()
    calls = record_calls(client, "PutObject")
    assert storage.upload_dir(src, uri, marker="dataset.json", client=client) == len(TREE)

    marker_start = calls.index(("start", "datasets/faces v1/dataset.json"))
    other_done = [i for i, (kind, key) in enumerate(calls) if kind == "done" and not key.endswith("dataset.json")]
    assert len(other_done) == len(TREE) - 1
    assert marker_start > max(other_done)

    local = storage.localize(uri, tmp_path / "cache")
    assert local == tmp_path / "cache" / bucket / "datasets" / "faces v1"
    assert read_tree(local) == TREE
    assert storage.localize(str(src), tmp_path / "cache") == src  # a local path is used in place


def test_localize_downloads_only_what_changed(bucket: str, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    uri = f"s3://{bucket}/data"
    storage.upload_dir(src, uri)
    client = storage.s3_client()
    gets = record_calls(client, "GetObject")

    storage.localize(uri, tmp_path / "cache", client=client)
    assert sorted(key for kind, key in gets if kind == "done") == sorted(f"data/{rel}" for rel in TREE)

    gets.clear()
    local = storage.localize(uri, tmp_path / "cache", client=client)
    assert gets == []  # nothing changed: nothing downloaded
    assert read_tree(local) == TREE

    probes.write_text(f"{uri}/with space/na\u00efve caf\u00e9.txt", "longer than before")
    storage.localize(uri, tmp_path / "cache", client=client)
    assert [key for kind, key in gets if kind == "done"] == ["data/with space/na\u00efve caf\u00e9.txt"]
    assert (local / "with space" / "na\u00efve caf\u00e9.txt").read_text() == "longer than before"


def test_localize_of_an_empty_prefix_names_it(bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFoundError, match=f"s3://{bucket}/nothing/here.*no objects"):
        storage.localize(f"s3://{bucket}/nothing/here", tmp_path)


def test_interrupted_upload_never_looks_complete(bucket: str, tmp_path: Path) -> None:
    """A re-upload that fails part-way leaves no marker, not even the old one."""
    uri = f"s3://{bucket}/ds"
    storage.upload_dir(write_tree(tmp_path / "v1", TREE), uri, marker="dataset.json")
    assert probes.exists(f"{uri}/dataset.json")

    client = storage.s3_client()

    def fail_shard(params: dict[str, Any], **_: Any):
        if params["url_path"].endswith(".tar"):  # the serialized request: the key is in the path
            from botocore.awsrequest import AWSResponse

            error = {"Error": {"Code": "InternalError", "Message": "injected"}, "ResponseMetadata": {}}
            return AWSResponse("", 500, {}, None), error
        return None

    client.meta.events.register("before-call.s3.PutObject", fail_shard)
    with pytest.raises(StorageError, match=f"{uri}/shard-000000.tar.*InternalError"):
        storage.upload_dir(write_tree(tmp_path / "v2", TREE), uri, marker="dataset.json", client=client)
    assert not probes.exists(f"{uri}/dataset.json")

    with pytest.raises(FileNotFoundError, match="_SUCCESS"):  # a marker the writer never wrote: no upload
        storage.upload_dir(tmp_path / "v2", f"s3://{bucket}/other", marker="_SUCCESS")
    assert probes.list_uris(f"s3://{bucket}/other") == []


def test_staged_output_uploads_on_success_only(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/curated"
    with storage.staged_output(uri) as out:
        staging = out
        assert out.is_dir() and not storage.is_s3(out)
        write_tree(out, TREE)
    assert not staging.exists()
    assert read_tree(storage.localize(uri, tmp_path / "cache")) == TREE

    failed = f"s3://{bucket}/failed"
    with pytest.raises(RuntimeError, match="writer broke"), storage.staged_output(failed) as out:
        write_tree(out, TREE)
        raise RuntimeError("writer broke")
    assert not out.exists()
    assert probes.list_uris(failed) == []

    with pytest.raises(FileNotFoundError, match=r"dataset\.json"), storage.staged_output(failed) as out:
        (out / "shard-000000.tar").write_bytes(b"x")  # no dataset.json: incomplete
    assert probes.list_uris(failed) == []

    local = tmp_path / "local-out"
    with storage.staged_output(local) as out:
        assert out == local and local.is_dir()


# ----------------------------------------------------------------------------------------------- errors


def test_missing_bucket_is_named(s3_server, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    src = tmp_path / "f.txt"
    src.write_text("x")
    uri = "s3://no-such-bucket-mole/a/f.txt"
    for call in (
        lambda: storage.upload_file(src, uri),
        lambda: probes.read_text(uri),
        lambda: storage.localize("s3://no-such-bucket-mole/a", tmp_path),
        lambda: probes.exists(uri),
    ):
        with pytest.raises(StorageNotFoundError, match="s3://no-such-bucket-mole/a") as info:
            call()
        assert "no-such-bucket-mole" in str(info.value)
        assert_no_secret(info.value, caplog, s3_server.secret_key)
    assert isinstance(info.value, FileNotFoundError)


def test_wrong_or_missing_credentials(bucket: str, s3_server, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    uri = f"s3://{bucket}/secret-test.txt"
    wrong = "wrong-secret-value-4711"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StorageError, match=f"{uri}.*access denied.*SignatureDoesNotMatch") as info:
        probes.write_text(uri, "x")
    assert_no_secret(info.value, caplog, wrong, s3_server.secret_key)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match=f"{uri}.*no usable S3 credentials") as info:
        probes.read_text(uri)
    assert_no_secret(info.value, caplog, wrong, s3_server.secret_key)


def test_endpoint_down_fails_fast_and_clearly(s3_server, monkeypatch, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{refused_port()}")
    client = storage.s3_client(max_attempts=3, connect_timeout=0.5, read_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://mole/x\.txt.*unreachable") as info:
        probes.read_text("s3://mole/x.txt", client=client)
    assert time.monotonic() - start < 10
    assert_no_secret(info.value, caplog, s3_server.secret_key)


def test_hung_server_times_out_within_bounds(bucket: str, s3_server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    uri = f"s3://{bucket}/hung.txt"
    client = storage.s3_client(max_attempts=2, connect_timeout=0.5, read_timeout=0.5)
    s3_server.suspend()
    try:
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"{uri}.*ReadTimeoutError") as info:
            probes.read_text(uri, client=client)
        elapsed = time.monotonic() - start
    finally:
        s3_server.resume()
    assert 0.9 < elapsed < 6  # two 0.5 s timeouts and at most 1 s backoff, not botocore's 60 s default
    assert_no_secret(info.value, caplog, s3_server.secret_key)


def test_transient_outage_during_multipart_upload_is_retried(bucket: str, s3_server, tmp_path: Path) -> None:
    """The server freezes for 2.5 s just as part 2 goes out; retries carry the upload through intact.

    The outage outlasts one attempt (botocore waits 1 s for "100 Continue", then 0.5 s for the answer), so the
    parts in flight must be sent again.
    """
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    client = storage.s3_client(max_attempts=10, connect_timeout=0.5, read_timeout=0.5)
    sends: list[int] = []
    outage: list[threading.Timer] = []

    def freeze_at_part_2(params: dict[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2 and not outage:
            s3_server.suspend()
            outage.append(threading.Timer(2.5, s3_server.resume))
            outage[0].start()

    client.meta.events.register("provide-client-params.s3.UploadPart", freeze_at_part_2)
    client.meta.events.register("before-send.s3.UploadPart", lambda **_: sends.append(1))
    start = time.monotonic()
    try:
        storage.upload_file(
            src, f"s3://{bucket}/big.bin", client=client, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
        )
    finally:
        for timer in outage:
            timer.join()
        s3_server.resume()
    assert outage, "the fault was never injected"
    assert time.monotonic() - start >= 2.5
    assert len(sends) > 3  # 3 parts, and at least one of them sent again
    body = s3_server.client().get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(src.read_bytes()).digest()
