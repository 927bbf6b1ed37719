"""Local paths and ``s3://`` URIs behind one small API, so that curation, training and tracking need not care where
their inputs and outputs live.

Endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL_S3`` or ``MLFLOW_S3_ENDPOINT_URL``
for a non-AWS server such as SeaweedFS or MinIO; ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or any other
source of boto3's default chain), never from configs or arguments, so a secret can't end up in a logged config.

Guarantees callers rely on:

* Local writes are atomic (:mod:`mole.atomic`: a hidden temporary, then rename): a crash never leaves a truncated
  file under the real name.
* :func:`upload_dir` uploads a folder's completion marker (``dataset.json``, ``_SUCCESS``) last, and deletes an
  older remote marker first, so a partial upload never looks complete to a reader that checks the marker.
* Transient faults (timeouts, refused connections, 5xx, throttling) are retried with exponential backoff by
  botocore (``standard`` retry mode); what still fails becomes a :class:`StorageError` naming the URI and the
  cause, with any secret from the environment redacted.

Tuning through the environment: ``MOLE_S3_MAX_ATTEMPTS`` (default 8), ``MOLE_S3_CONNECT_TIMEOUT`` (s, default 10),
``MOLE_S3_READ_TIMEOUT`` (s, default 60), ``MOLE_S3_ADDRESSING_STYLE`` (``path`` by default when an endpoint is
set, as S3-compatible servers expect), ``MOLE_STAGING_DIR`` (where :func:`staged_output` stages, default the
system temp folder).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mole import atomic
from mole.security import redact

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.client import BaseClient

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
#: Files from this size on go up and down in parts (parallel, each part retried on its own).
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB
DEFAULT_MAX_WORKERS = 8
#: The completion marker of mole's dataset folders (``mole.data.shards.INDEX_FILE``; not imported from there to
#: keep this module free of numpy and PIL).
DATASET_MARKER = "dataset.json"

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED_CODES = {
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidSecurity", "AllAccessDisabled",
}  # fmt: skip
_client_lock = threading.Lock()
_loader: Any = None  # botocore's service-model loader, shared by all clients (read-only after loading)


class StorageError(OSError):
    """An S3 operation failed after retries: the message names the URI and the cause, never a secret."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The bucket, object or prefix does not exist (also a :class:`FileNotFoundError`, as for local paths)."""


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names S3 storage rather than a local path."""
    return str(uri).startswith("s3://")


class StorageURIError(StorageError, ValueError):
    """An ``s3://`` URI that is malformed or unsafe (credentials in it, ``..`` in its key); raised before any I/O."""


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")`` (surrounding slashes of the key dropped).

    Refuses credentials in the URI (they belong in the environment, and would be printed) and ``.``/``..`` key
    segments: the key becomes a local path under the download cache (:func:`localize`), which ``s3://raw/../../x``
    would escape.

    Raises:
        StorageURIError: No bucket, userinfo in the bucket part, or a ``.``/``..`` segment in the key.
    """
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageURIError(f"not an s3 URI with a bucket: {redact(uri)!r}")
    if "@" in bucket or ":" in bucket:
        raise StorageURIError(
            f"{redact(uri)}: credentials do not go into an s3:// URI; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if any(part in (".", "..") for part in key.split("/")):
        raise StorageURIError(f"{redact(uri)}: '.' and '..' are not allowed in an s3:// key (it becomes a local path)")
    return bucket, key.strip("/")


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """``base`` with ``parts`` appended by ``/`` for S3 or the OS separator locally."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _env_number(name: str, default: float, kind: Callable[[str], float]) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment, ``None`` for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def s3_client(
    *,
    max_attempts: int | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> BaseClient:
    """A boto3 S3 client for the endpoint in the environment, with retries and timeouts.

    Credentials are left to boto3's default chain (environment, then files or instance roles) so that they come
    from the pod's secret, not from mole's configs. Retries use botocore's ``standard`` mode: exponential backoff
    with jitter on timeouts, refused connections, 5xx and throttling, so a restarting S3 server or a brief
    network hiccup does not fail a long job.

    Args:
        max_attempts: Attempts per request, the first included (default ``MOLE_S3_MAX_ATTEMPTS`` or 8).
        connect_timeout: Seconds to wait for a connection (default ``MOLE_S3_CONNECT_TIMEOUT`` or 10).
        read_timeout: Seconds to wait on a socket read or write (default ``MOLE_S3_READ_TIMEOUT`` or 60).
    """
    import boto3
    import botocore.loaders
    import botocore.session
    from botocore.config import Config

    endpoint = endpoint_url()
    s3_options: dict[str, Any] = {}
    style = os.environ.get("MOLE_S3_ADDRESSING_STYLE") or ("path" if endpoint else None)
    if style:
        s3_options["addressing_style"] = style
    config = Config(
        retries={  # botocore's "max_attempts" counts retries only; "total_max_attempts" the first attempt too
            "total_max_attempts": max_attempts or _env_number("MOLE_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, int),
            "mode": "standard",
        },
        connect_timeout=connect_timeout or _env_number("MOLE_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, float),
        read_timeout=read_timeout or _env_number("MOLE_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, float),
        max_pool_connections=max(DEFAULT_MAX_WORKERS * 2, 10),
        s3=s3_options or None,
    )
    with _client_lock:
        # A new session per client: boto3's default session caches the credentials it first found, so a rotated
        # secret (or a test's) would be ignored. The shared loader keeps this cheap (~25 ms, not ~90 ms).
        global _loader
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        core = botocore.session.get_session()
        core.register_component("data_loader", _loader)
        return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint, config=config)


def transfer_config(
    multipart_threshold: int | None = None, multipart_chunksize: int | None = None, max_concurrency: int = 8
) -> TransferConfig:
    """boto3's transfer settings: files from ``multipart_threshold`` bytes on move in ``multipart_chunksize`` parts.

    S3 needs parts of at least 5 MiB (the last one excepted), hence no smaller chunk size.
    """
    from boto3.s3.transfer import TransferConfig

    chunk = multipart_chunksize or DEFAULT_MULTIPART_CHUNKSIZE
    if chunk < 5 * MiB:
        raise ValueError(f"multipart_chunksize={chunk} is below S3's minimum part size of 5 MiB")
    return TransferConfig(
        multipart_threshold=multipart_threshold or DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize=chunk,
        max_concurrency=max_concurrency,
        use_threads=True,
    )


# ----------------------------------------------------------------------------------------------------- errors


def _find_cause(err: BaseException) -> BaseException:
    """The botocore exception behind ``err`` (boto3 wraps ClientError in S3UploadFailedError, for one)."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ClientError | BotoCoreError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return err


def _storage_error(action: str, uri: str, err: BaseException, client: BaseClient | None = None) -> StorageError:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    cause = _find_cause(err)
    endpoint = (client.meta.endpoint_url if client is not None else None) or endpoint_url() or "AWS S3"
    error_cls: type[StorageError] = StorageError
    if isinstance(cause, ClientError):
        info = cause.response.get("Error", {})
        code = str(info.get("Code", "?"))
        message = info.get("Message") or cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0] if is_s3(uri) else "?"
            error_cls, text = StorageNotFoundError, f"bucket {bucket!r} does not exist at {endpoint}"
        elif code in _NOT_FOUND_CODES:
            error_cls, text = StorageNotFoundError, "no such object (or bucket)"
        elif code in _DENIED_CODES:
            text = (
                f"access denied by {endpoint} ({code}: {message}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "and the permissions on the bucket"
            )
        else:
            text = f"{code}: {message}"
    elif isinstance(cause, NoCredentialsError | PartialCredentialsError):
        text = (
            f"no usable S3 credentials ({cause}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (pipeline steps "
            "read them from the Secret named by the pipeline's s3_secret parameter, default mole-s3, unless a "
            "workload identity on their ServiceAccount stands in)"
        )
    elif isinstance(cause, ConnectionError | ReadTimeoutError | ConnectionClosedError):
        text = f"S3 endpoint {endpoint} unreachable or not answering, retries exhausted ({type(cause).__name__})"
    else:
        text = f"{type(cause).__name__}: {cause}"
    return error_cls(redact(f"{action} {uri} failed: {text}"))


@contextlib.contextmanager
def _translate(action: str, uri: str, client: BaseClient | None = None) -> Iterator[None]:
    """Turn botocore/boto3 failures inside the block into :class:`StorageError`."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise _storage_error(action, uri, err, client) from err


def _s3_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"{uri!r} names a bucket, not an object")
    return bucket, key


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replaced(dest) as tmp:
        shutil.copyfile(src, tmp)


# ----------------------------------------------------------------------------------------------------- files


def upload_file(
    local: str | os.PathLike[str],
    uri: str,
    *,
    client: BaseClient | None = None,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
) -> None:
    """Copy one file to ``uri`` (an ``s3://`` object or a local path, written atomically).

    Big files go in parallel parts (see :func:`transfer_config`); each request is retried on its own, and an
    object only appears once every part is in, so a reader never sees half an upload.

    Raises:
        FileNotFoundError: ``local`` is not a file.
        StorageError: The upload failed after retries.
    """
    src = Path(local)
    if not src.is_file():
        raise FileNotFoundError(f"cannot upload {src}: not a file")
    if not is_s3(uri):
        _atomic_copy(src, Path(uri))
        return
    bucket, key = _s3_key(uri)
    client = client or s3_client()
    with _translate("upload to", uri, client):
        client.upload_file(str(src), bucket, key, Config=transfer_config(multipart_threshold, multipart_chunksize))
    logger.debug("uploaded %s to %s (%d bytes)", src, uri, src.stat().st_size)


def download_file(
    uri: str,
    local: str | os.PathLike[str],
    *,
    client: BaseClient | None = None,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
) -> Path:
    """Copy ``uri`` to the file ``local`` through ``local.part``, so a failed download leaves no partial file.

    Raises:
        StorageNotFoundError: No such object (or bucket). StorageError: Any other failure after retries.
    """
    dest = Path(local)
    if not is_s3(uri):
        _atomic_copy(Path(uri), dest)
        return dest
    bucket, key = _s3_key(uri)
    client = client or s3_client()
    with atomic.replaced(dest) as tmp, _translate("download of", uri, client):
        client.download_file(bucket, key, str(tmp), Config=transfer_config(multipart_threshold, multipart_chunksize))
    return dest


def _list_objects(uri: str, client: BaseClient) -> Iterator[dict[str, Any]]:
    """The objects under the "folder" ``uri`` (all of the bucket when it has no key)."""
    bucket, prefix = split_s3(uri)
    paginator = client.get_paginator("list_objects_v2")
    with _translate("listing of", uri, client):
        for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            yield from page.get("Contents", [])


# ----------------------------------------------------------------------------------------------------- folders


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _run_all(jobs: list[Callable[[], None]], max_workers: int) -> None:
    """Run ``jobs`` in threads; the first failure cancels what has not started and is raised."""
    if not jobs:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def upload_dir(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    marker: str | None = None,
    client: BaseClient | None = None,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> int:
    """Upload the files under ``local_dir`` to the folder ``uri``, keeping relative paths; returns the file count.

    With ``marker`` (a path relative to ``local_dir`` such as ``dataset.json`` or ``_SUCCESS``), an existing
    remote marker is deleted first and the new one uploaded only after every other file is in: readers that
    wait for the marker never see a half-uploaded (or half-replaced) folder. Remote files absent locally are kept.

    Raises:
        NotADirectoryError: ``local_dir`` is not a folder.
        FileNotFoundError: ``marker`` is missing from ``local_dir`` (the folder is incomplete; nothing is uploaded).
        StorageError: An upload failed after retries (the marker is then not uploaded).
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"cannot upload {root}: not a folder")
    files = _relative_files(root)
    marker_rel = Path(marker).as_posix() if marker else None
    if marker_rel is not None:
        if marker_rel not in files:
            raise FileNotFoundError(f"{root}: completion marker {marker_rel!r} missing; not uploading to {uri}")
        files.remove(marker_rel)
    if is_s3(uri):
        client = client or s3_client()
        if marker_rel is not None:
            marker_uri = join_uri(uri, marker_rel)
            bucket, key = _s3_key(marker_uri)
            with _translate("removal of the old marker", marker_uri, client):
                client.delete_object(Bucket=bucket, Key=key)

    def job(rel: str) -> Callable[[], None]:
        return lambda: upload_file(
            root / rel,
            join_uri(uri, rel),
            client=client,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
        )

    _run_all([job(rel) for rel in files], max_workers)
    if marker_rel is not None:
        job(marker_rel)()
    count = len(files) + (marker_rel is not None)
    logger.info("uploaded %d files from %s to %s%s", count, root, uri, f" ({marker_rel} last)" if marker_rel else "")
    return count


def _safe_relative(key: str, prefix: str, uri: str) -> str:
    rel = key[len(prefix) :].lstrip("/") if prefix else key
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise StorageError(f"download of {uri} failed: object key {key!r} cannot be mapped to a local file safely")
    return rel


def download_dir(
    uri: str | os.PathLike[str],
    local_dir: str | os.PathLike[str],
    *,
    client: BaseClient | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> Path:
    """Mirror the folder ``uri`` into ``local_dir``; files already there with the object's size are skipped.

    The size check makes an interrupted download resumable and a second call cheap; files land atomically
    (a temporary then rename), so a size match means a complete earlier download. Local files absent remotely are
    kept. A local ``uri`` is copied the same way.

    Raises:
        StorageNotFoundError: The bucket does not exist, or nothing is under the prefix.
        StorageError: A listing or download failed after retries, or an object key is unsafe as a local path.
    """
    target = Path(local_dir)
    if not is_s3(uri):
        src = Path(uri)
        if not src.is_dir():
            raise FileNotFoundError(f"cannot copy {src}: not a folder")
        if src.resolve() != target.resolve():
            for rel in _relative_files(src):
                dest = target / rel
                if not (dest.is_file() and dest.stat().st_size == (src / rel).stat().st_size):
                    _atomic_copy(src / rel, dest)
        return target
    uri = str(uri)
    bucket, prefix = split_s3(uri)
    client = client or s3_client()
    pending: list[tuple[str, Path]] = []
    listed = 0
    for obj in _list_objects(uri, client):
        if obj["Key"].endswith("/"):  # a "folder" placeholder some tools create
            continue
        listed += 1
        dest = target / _safe_relative(obj["Key"], prefix, uri)
        if dest.is_file() and dest.stat().st_size == obj["Size"]:
            continue
        pending.append((obj["Key"], dest))
    if listed == 0:
        raise StorageNotFoundError(f"download of {uri} failed: no objects under this prefix")

    def job(key: str, dest: Path) -> Callable[[], None]:
        return lambda: download_file(f"s3://{bucket}/{key}", dest, client=client)

    _run_all([job(key, dest) for key, dest in pending], max_workers)
    logger.info("%s: %d of %d files downloaded to %s", uri, len(pending), listed, target)
    return target


def localize(uri: str | os.PathLike[str], cache: str | os.PathLike[str], *, client: BaseClient | None = None) -> Path:
    """A local folder with the contents of ``uri``: the path itself, or an ``s3://`` prefix mirrored into
    ``cache/<bucket>/<prefix>`` (files already there with the same size are not downloaded again).

    Raises:
        StorageNotFoundError: The bucket does not exist, or nothing is under the prefix.
        StorageError: Listing or downloading failed after retries.
    """
    if not is_s3(uri):
        return Path(uri)
    bucket, prefix = split_s3(str(uri))
    return download_dir(uri, Path(cache) / bucket / prefix, client=client)


@contextlib.contextmanager
def staged_output(
    uri: str | os.PathLike[str], *, marker: str | None = DATASET_MARKER, client: BaseClient | None = None
) -> Iterator[Path]:
    """A local folder to write an output into; for an ``s3://`` URI it is uploaded on a clean exit.

    Producers (curation, exports) then only ever write local files. A local ``uri`` is yielded as is (created if
    needed). For S3, a temporary folder (under ``MOLE_STAGING_DIR`` if set) is yielded and, when the block ends
    without an exception, uploaded with :func:`upload_dir`, ``marker`` last; on an exception nothing is uploaded.
    The temporary folder is removed either way.

    Args:
        uri: The output folder: a local path or an ``s3://`` prefix.
        marker: The file that marks the output complete (``dataset.json`` for datasets); ``None`` for none.
        client: The S3 client to upload with (default :func:`s3_client`).

    Raises:
        FileNotFoundError: ``marker`` was not written (the output is incomplete; nothing is uploaded).
        StorageError: The upload failed after retries.
    """
    if not is_s3(uri):
        path = Path(uri)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"output {path} is an existing file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    split_s3(str(uri))  # a malformed URI fails before any work is done
    staging = Path(tempfile.mkdtemp(prefix="mole-stage-", dir=os.environ.get("MOLE_STAGING_DIR") or None))
    try:
        try:
            yield staging
        except BaseException:
            logger.warning("output for %s not uploaded: the writer failed", uri)
            raise
        upload_dir(staging, str(uri), marker=marker, client=client)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
