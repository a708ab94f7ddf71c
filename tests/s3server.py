"""A real S3-compatible server for tests: moto in server mode on a loopback port, reached by s3fs
over HTTP exactly like S3 (in-process `mock_aws` patches botocore and does not work with async
s3fs). Clients find it through the standard AWS environment variables, as users' stores are."""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

DUMMY = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "eu-central-1",
}


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>

    @property
    def env(self) -> dict[str, str]:
        """What a process (or a worker) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **DUMMY}

    def bucket(self) -> str:
        """A new, empty bucket; its URL `s3://<name>`."""
        from refany3d.storage.fs import url_to_fs

        name = f"refany3d-{uuid.uuid4().hex[:12]}"
        fs, _ = url_to_fs(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Forget every bucket (moto's reset endpoint)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"))


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start `ThreadedMotoServer` on a free loopback port; point this process's AWS variables at it
    (restored afterwards)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        yield s3
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
