"""The model store's objects: the same protocol tests on a folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from deltakit.errors import InputNotFoundError, ObjectStoreError, UnsupportedInputError
from deltakit.modelstore.objects import LocalObjects, Objects, open_objects


def _random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(str(seed).encode()).digest() * 32768  # 1 MiB, not all one byte
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            f.write(block[i % 7 :] + block[: i % 7])
        f.write(os.urandom(size % len(block)))
    return path


def test_both_implement_the_protocol(objects):
    assert isinstance(objects, Objects)


def test_a_file_larger_than_one_part_round_trips_byte_for_byte(objects, tmp_path):
    source = _random_file(tmp_path / "in" / "shard.safetensors", (6 << 20) + 12345)  # two 5 MiB parts
    objects.put_file("blobs/ab/shard", source)
    assert objects.exists("blobs/ab/shard")
    assert objects.size("blobs/ab/shard") == source.stat().st_size
    dest = tmp_path / "out" / "shard.safetensors"
    dest.parent.mkdir()
    objects.get_file("blobs/ab/shard", dest)
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["shard.safetensors"]  # no temporary file left


def test_the_s3_upload_of_a_big_file_went_in_parts(s3_objects, seaweed, tmp_path):
    import boto3

    source = _random_file(tmp_path / "big", (11 << 20) + 1)
    s3_objects.put_file("big", source)
    client = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        region_name="us-east-1",
    )
    etag = client.head_object(Bucket=seaweed.bucket, Key=f"{s3_objects.prefix}/big")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # a multipart ETag counts its parts
    assert s3_objects.local_path("big") is None


def test_exists_size_keys_by_prefix_and_delete(objects, tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for key in ("models/a/1", "models/a/2", "models/b/1", "other"):
        objects.put_file(key, small)
    objects.put_file("models/empty", empty)
    assert objects.size("models/empty") == 0
    assert sorted(objects.keys("models/a/")) == ["models/a/1", "models/a/2"]
    assert sorted(objects.keys("models/")) == ["models/a/1", "models/a/2", "models/b/1", "models/empty"]
    assert sorted(objects.keys()) == ["models/a/1", "models/a/2", "models/b/1", "models/empty", "other"]
    assert objects.size("models/b/1") == 100
    objects.delete("models/a/1")
    objects.delete("models/a/1")  # again: a missing key is no error
    objects.delete("never/was")
    assert not objects.exists("models/a/1")
    assert sorted(objects.keys("models/a/")) == ["models/a/2"]


def test_a_missing_key_is_input_not_found(objects, tmp_path):
    assert not objects.exists("no/such")
    with pytest.raises(InputNotFoundError, match="no/such"):
        objects.size("no/such")
    (tmp_path / "out").mkdir()
    with pytest.raises(InputNotFoundError, match="no/such"):
        objects.get_file("no/such", tmp_path / "out" / "dest")
    assert os.listdir(tmp_path / "out") == []  # nothing, not even a temporary file


def test_putting_an_existing_key_again_is_harmless(objects, tmp_path):
    first = tmp_path / "first"
    first.write_bytes(b"the first bytes")
    objects.put_file("k", first)
    objects.put_file("k", first)
    assert list(objects.keys()) == ["k"]
    out = tmp_path / "out"
    objects.get_file("k", out)
    assert out.read_bytes() == b"the first bytes"


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "a//b", "", ".hidden", "a/./b", "a\\b", "sp ace"])
def test_hostile_keys_are_refused(objects, tmp_path, key):
    source = tmp_path / "f"
    source.write_bytes(b"x")
    with pytest.raises(UnsupportedInputError, match="not a valid object key"):
        objects.put_file(key, source)
    with pytest.raises(UnsupportedInputError, match="not a valid object key"):
        objects.get_file(key, tmp_path / "out")
    with pytest.raises(UnsupportedInputError, match="not a valid object key"):
        objects.exists(key)
    assert list(objects.keys()) == []


def test_s3_describes_itself_and_keeps_keys_under_its_prefix(s3_objects, seaweed, tmp_path):
    from deltakit.modelstore.s3 import S3Objects

    assert s3_objects.describe() == f"s3://{seaweed.bucket}/{s3_objects.prefix}"
    source = tmp_path / "f"
    source.write_bytes(b"under the prefix")
    s3_objects.put_file("k", source)
    root = S3Objects(
        seaweed.bucket,
        endpoint_url=seaweed.endpoint,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    )
    assert root.describe() == f"s3://{seaweed.bucket}"
    assert f"{s3_objects.prefix}/k" in set(root.keys(s3_objects.prefix))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_endpoint_fails_fast_and_says_where():
    from deltakit.modelstore.s3 import S3Objects

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    began = time.monotonic()
    with pytest.raises(ObjectStoreError, match=r"cannot reach the object store at http://127\.0\.0\.1:\d+") as caught:
        S3Objects("some-bucket", endpoint_url=endpoint, access_key_id="k", secret_access_key="s", region="us-east-1")
    assert time.monotonic() - began < 10
    assert "some-bucket" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_endpoint_that_never_answers_times_out_in_seconds():
    """A listening socket that never answers: the read timeout, not the default minute, bounds the wait."""
    from deltakit.modelstore.s3 import S3Objects

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        with pytest.raises(ObjectStoreError, match="did not answer in time, for bucket 'some-bucket'"):
            S3Objects(
                "some-bucket",
                endpoint_url=endpoint,
                access_key_id="k",
                secret_access_key="s",
                region="us-east-1",
                read_timeout=1,
            )
        assert time.monotonic() - began < 5


def test_bad_credentials_name_the_bucket(seaweed):
    from deltakit.modelstore.s3 import S3Objects

    with pytest.raises(ObjectStoreError, match=rf"refused access to bucket '{seaweed.bucket}'.*AWS_ACCESS_KEY_ID"):
        S3Objects(
            seaweed.bucket,
            endpoint_url=seaweed.endpoint,
            access_key_id=seaweed.access_key,
            secret_access_key="not-the-secret",
            region="us-east-1",
        )


def test_a_missing_bucket_is_named(seaweed):
    from deltakit.modelstore.s3 import S3Objects

    with pytest.raises(ObjectStoreError, match=r"the bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"):
        S3Objects(
            "no-such-bucket",
            endpoint_url=seaweed.endpoint,
            access_key_id=seaweed.access_key,
            secret_access_key=seaweed.secret_key,
            region="us-east-1",
        )


def test_open_objects_takes_the_endpoint_and_keys_from_the_aws_variables(seaweed, monkeypatch, tmp_path):
    from deltakit.modelstore.s3 import S3Objects

    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = open_objects(f"s3://{seaweed.bucket}/from-env/", tmp_path)
    assert isinstance(store, S3Objects)
    assert store.describe() == f"s3://{seaweed.bucket}/from-env"
    source = tmp_path / "f"
    source.write_bytes(b"env")
    store.put_file("k", source)
    assert store.size("k") == 3


def test_open_objects_defaults_to_a_folder_under_the_home(tmp_path):
    for spec in (None, ""):
        store = open_objects(spec, tmp_path)
        assert isinstance(store, LocalObjects)
        assert store.describe() == str(tmp_path / "store")


@pytest.mark.parametrize("spec", ["/srv/store", "gs://bucket/x", "s3:/bucket", "file:///x"])
def test_open_objects_refuses_other_specs_naming_the_setting(spec, tmp_path):
    with pytest.raises(UnsupportedInputError, match="DELTAKIT_STORE"):
        open_objects(spec, tmp_path)


@pytest.mark.parametrize("spec", ["s3://", "s3://UPPER/x", "s3://ab", "s3://bucket/../x"])
def test_open_objects_refuses_bad_buckets_and_prefixes_naming_the_setting(spec, tmp_path):
    with pytest.raises(UnsupportedInputError, match="DELTAKIT_STORE"):
        open_objects(spec, tmp_path)


def test_open_objects_without_boto3_says_which_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.delitem(sys.modules, "deltakit.modelstore.s3", raising=False)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    with pytest.raises(UnsupportedInputError, match=r"deltakit-llm\[s3\]"):
        open_objects("s3://bucket/prefix", tmp_path)


def test_the_store_setting_takes_a_bucket_and_names_itself_when_mistaken(monkeypatch):
    from deltakit_service.settings import load_settings

    monkeypatch.setenv("DELTAKIT_STORE", "s3://models/team")
    assert load_settings().store == "s3://models/team"
    monkeypatch.setenv("DELTAKIT_STORE", "")
    assert not load_settings().store
    monkeypatch.setenv("DELTAKIT_STORE", "gs://models")
    with pytest.raises(UnsupportedInputError, match=r"DELTAKIT_STORE is not empty .* s3://BUCKET/PREFIX"):
        load_settings()
