"""The model store's objects in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph...), through boto3.

The endpoint, keys and region come from where boto3 looks for them (AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_DEFAULT_REGION, the AWS
config files); this module reads none of them itself. Keys live under the store's prefix in the bucket.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import boto3  # the optional extra `s3`; this module loads only when a bucket is asked for
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as EndpointUnreachable

from ..errors import InputNotFoundError, ObjectStoreError, UnsupportedInputError
from .objects import KEY, check_key

__all__ = ["DEFAULT_PART_SIZE", "S3Objects"]

# Parts of a multipart upload: 64 MiB keeps a 5 GB shard at 80 parts (S3 allows 10000, s3transfer raises
# the size past that), and big enough that requests cost little next to the bytes.
DEFAULT_PART_SIZE = 64 << 20

# S3's rule for bucket names (3 to 63 lowercase letters, digits, dots and hyphens).
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")

# The codes a store answers with when it does not take the credentials, or will not let them do this.
_DENIED = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
)


_PROBE_TIMEOUT = 5.0  # seconds the first request (HEAD of the bucket) waits for an answer

_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def check_bucket(bucket: str) -> str:
    """``bucket`` if it is a valid S3 bucket name; else an ``UnsupportedInputError`` naming it."""
    if not 3 <= len(bucket) <= 63 or not set(bucket) <= _BUCKET_CHARS or not bucket[0].isalnum():
        raise UnsupportedInputError(f"{bucket!r} is not a valid S3 bucket name (3 to 63 of a-z, 0-9, '.', '-')")
    return bucket


class S3Objects:
    """Objects in an S3 bucket, under a prefix: ``S3Objects("models", "team/store")`` keeps key ``k`` at
    ``s3://models/team/store/k``.

    Creating one asks the bucket once (a HEAD), so that a missing bucket, refused credentials or an
    unreachable endpoint are said at start-up rather than at the first download.

    Args:
        bucket: the bucket, which must exist.
        prefix: the folder of the store within the bucket ('' for its root).
        endpoint_url, access_key_id, secret_access_key, region: to override what boto3 finds itself
            (the environment, the AWS config files); None leaves each to boto3.
        part_size: files larger than this are uploaded in parts of this size (at least 5 MiB, S3's
            smallest part), several at a time.
        connect_timeout: seconds to wait for a connection before the request counts as failed.
        read_timeout: seconds to wait for an answer once connected.
        attempts: how many times a request is tried in all (retries with backoff, for errors worth
            retrying), kept small so that an unreachable endpoint is said within seconds. The first
            request, the bucket's HEAD, is tried once and waits at most 5 s for an answer.

    Raises:
        UnsupportedInputError: the bucket name or prefix is not valid.
        ObjectStoreError: the bucket does not exist, the credentials are refused, or the endpoint
            cannot be reached.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        attempts: int = 2,
    ) -> None:
        self.bucket = check_bucket(bucket)
        prefix = prefix.strip("/")
        if prefix and not KEY.match(prefix):
            raise UnsupportedInputError(f"{prefix!r} is not a valid prefix for the store in bucket {bucket!r}")
        self.prefix = prefix
        self._root = f"{prefix}/" if prefix else ""

        def client(read_timeout: float, attempts: int) -> Any:
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": attempts, "mode": "standard"},
            )
            with _SESSION_LOCK:  # a boto3 session makes clients one thread at a time
                global _SESSION
                if _SESSION is None:
                    _SESSION = boto3.session.Session()  # loads S3's service model once, not per client
                return _SESSION.client(
                    "s3",
                    endpoint_url=endpoint_url,
                    aws_access_key_id=access_key_id,
                    aws_secret_access_key=secret_access_key,
                    region_name=region,
                    config=config,
                )

        self._client = client(read_timeout, attempts)
        self.endpoint = str(self._client.meta.endpoint_url)
        self._transfer = TransferConfig(
            multipart_threshold=part_size, multipart_chunksize=max(part_size, 5 << 20), max_concurrency=8
        )
        try:
            # once, without retries and with a short read timeout: an endpoint that takes the connection but
            # never answers is said in seconds too
            client(min(read_timeout, _PROBE_TIMEOUT), 1).head_bucket(Bucket=self.bucket)
        except Exception as e:
            self._fail(e, None)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            self._fail(e, key)
        return True

    def size(self, key: str) -> int:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            self._fail(e, key)
        return int(head["ContentLength"])

    def put_file(self, key: str, path: Path) -> None:
        if self.exists(key):  # objects are immutable: the same key holds the same bytes
            return
        try:
            # upload_file goes multipart past the threshold; S3 shows the object only once it is complete
            self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)
        except Exception as e:
            self._fail(e, key)

    def get_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        temp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            try:
                self._client.download_file(self.bucket, self._key(key), str(temp), Config=self._transfer)
            except Exception as e:
                self._fail(e, key)
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        check_key(key)
        return None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _code(e) not in ("404", "NoSuchKey", "NotFound"):  # S3 itself answers 204 for a missing key
                self._fail(e, key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._root + prefix.lstrip("/")
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield str(item["Key"])[len(self._root) :]
        except Exception as e:
            self._fail(e, None)

    def _fail(self, error: Exception, key: str | None) -> NoReturn:
        """``error`` (from boto3) as a deltakit error naming the bucket and key; anything else raised again."""
        where = f"{self.describe()}/{key}" if key is not None else f"bucket {self.bucket!r}"
        if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError):
            error = error.__context__  # upload_file wraps the answer it failed on; that answer is the fact
        code = _code(error)
        if isinstance(error, ClientError):
            message = error.response.get("Error", {}).get("Message") or code
            if code in ("NoSuchBucket",) or (key is None and code in ("404", "NotFound")):
                raise ObjectStoreError(
                    f"the bucket {self.bucket!r} does not exist at {self.endpoint}", argument="store"
                ) from error
            if key is not None and code in ("404", "NoSuchKey", "NotFound"):
                raise InputNotFoundError(f"the store {self.describe()} has no object {key!r}") from error
            if code in _DENIED:
                raise ObjectStoreError(
                    f"{self.endpoint} refused access to {where} ({code}: {message}): check AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY",
                    argument="store",
                ) from error
            raise ObjectStoreError(f"{self.endpoint} failed a request for {where} ({code}: {message})") from error
        if isinstance(error, NoCredentialsError | PartialCredentialsError):
            raise ObjectStoreError(
                f"no credentials for bucket {self.bucket!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                argument="store",
            ) from error
        if isinstance(error, EndpointUnreachable):
            raise ObjectStoreError(
                f"cannot reach the object store at {self.endpoint} for {where}: {error}", argument="store"
            ) from error
        if isinstance(error, ReadTimeoutError):
            raise ObjectStoreError(
                f"the object store at {self.endpoint} took the connection but did not answer in time, for {where}",
                argument="store",
            ) from error
        if isinstance(error, BotoCoreError | S3UploadFailedError):
            raise ObjectStoreError(f"the object store at {self.endpoint} failed for {where}: {error}") from error
        raise error


def _code(error: Exception) -> str:
    """The S3 error code of a boto3 ``ClientError`` (``NoSuchKey``, ``403``...), else ''."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""
