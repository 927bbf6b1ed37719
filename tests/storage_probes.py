"""Small storage probes the tests use to look at what the library wrote (local paths and s3://), through the
library's own error translation. Not part of mole: nothing in it needs them."""

from __future__ import annotations

import os
from pathlib import Path

from botocore.client import BaseClient

from mole import storage


def exists(uri: str | os.PathLike[str], *, client: BaseClient | None = None) -> bool:
    """Whether ``uri`` is an object, or a prefix with objects under it (an S3 "folder"), or a local path.

    Raises:
        StorageNotFoundError: The bucket does not exist (a typo should not read as "not there yet").
    """
    if not storage.is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import BotoCoreError, ClientError

    uri = str(uri)
    bucket, key = storage.split_s3(uri)
    client = client or storage.s3_client()
    if key:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) not in storage._NOT_FOUND_CODES:
                raise storage._storage_error("lookup of", uri, err, client) from err
        except BotoCoreError as err:
            raise storage._storage_error("lookup of", uri, err, client) from err
    with storage._translate("lookup of", uri, client):
        page = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    return bool(page.get("KeyCount") or page.get("Contents"))


def list_uris(prefix_uri: str | os.PathLike[str], *, client: BaseClient | None = None) -> list[str]:
    """Every object (file) under the folder ``prefix_uri``, recursively, as sorted URIs (paths locally).

    A missing local folder or an empty prefix gives ``[]``; a missing bucket raises.

    Raises:
        StorageNotFoundError: The bucket does not exist. StorageError: Listing failed after retries.
    """
    if not storage.is_s3(prefix_uri):
        root = Path(prefix_uri)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    uri = str(prefix_uri)
    bucket, _ = storage.split_s3(uri)
    client = client or storage.s3_client()
    keys = [obj["Key"] for obj in storage._list_objects(uri, client)]
    return sorted(f"s3://{bucket}/{key}" for key in keys if not key.endswith("/"))


def read_text(uri: str | os.PathLike[str], *, encoding: str = "utf-8", client: BaseClient | None = None) -> str:
    """The contents of a small text file (a dataset index, a manifest), local or on S3.

    Raises:
        FileNotFoundError: No such file (:class:`StorageNotFoundError` on S3). StorageError: Read failed.
    """
    if not storage.is_s3(uri):
        return Path(uri).read_text(encoding=encoding)
    uri = str(uri)
    bucket, key = storage._s3_key(uri)
    client = client or storage.s3_client()
    with storage._translate("read of", uri, client):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body.decode(encoding)


def write_text(
    uri: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", client: BaseClient | None = None
) -> None:
    """Write a small text file, atomically: a local ``.part`` renamed into place, or a single S3 PUT.

    Raises:
        StorageError: The write failed after retries.
    """
    data = text.encode(encoding)
    if not storage.is_s3(uri):
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return
    uri = str(uri)
    bucket, key = storage._s3_key(uri)
    client = client or storage.s3_client()
    with storage._translate("write of", uri, client):
        client.put_object(Bucket=bucket, Key=key, Body=data)
