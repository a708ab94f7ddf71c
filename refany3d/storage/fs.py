"""The one place that turns a URL into a filesystem: local paths, `s3://` (s3fs), any fsspec URL.

`s3://` takes its endpoint, credentials and region from the standard AWS environment variables
(`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION` or `AWS_REGION`) and passes them to s3fs explicitly, so
any S3-compatible store (MinIO, Ceph, R2, moto) works with no setting of ours; unset variables
leave botocore's own chain (profiles, instance roles) in charge.

s3fs caches directory listings per process. Other processes (workers on other machines) write
into the same prefix while this one reads, so every lookup starts from a fresh listing
(`invalidate_cache`): a reader never misses a shard or marker another worker committed.
"""

from __future__ import annotations

import os

import fsspec
from fsspec.core import url_to_fs as _fsspec_url_to_fs

S3_PROTOCOLS = ("s3://", "s3a://")
# Filesystems whose rename is atomic; on object stores one PUT is (a reader sees all of an object
# or none of it), and a rename is a copy plus a delete.
RENAMES = ("file", "local", "memory")


def s3_options(environ: dict[str, str] | None = None) -> dict:
    """s3fs arguments from the standard AWS environment variables (only those that are set)."""
    env = os.environ if environ is None else environ
    options: dict = {}
    client: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        client["region_name"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["token"] = env["AWS_SESSION_TOKEN"]
    if client:
        options["client_kwargs"] = client
    return options


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of `url`; s3 through `s3_options`, with a fresh listing."""
    if url.startswith(S3_PROTOCOLS):
        fs = fsspec.filesystem("s3", **s3_options())  # fsspec reuses one instance per options
        fs.invalidate_cache()
        return fs, fs._strip_protocol(url)
    return _fsspec_url_to_fs(url)


def atomic_rename(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` renames atomically (local disks) rather than copying (object stores)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in RENAMES for p in protocols)
