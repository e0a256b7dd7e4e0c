"""Real object servers on loopback for the remote-data tests: nginx (HTTP with ranges) and moto (S3).

Each server is a process this module starts on a free 127.0.0.1 port and stops; ``stop()``
then ``start()`` again on the same port is how the fault tests take a server away mid-run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url}")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def need_nginx() -> None:
    """Skip without nginx; under CI (which installs it, .ci/run) fail instead."""
    import pytest

    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs the Debian package)")
        pytest.skip("nginx is not installed (apt-get install nginx)")


class Nginx:
    """``nginx`` serving ``root`` at ``http://127.0.0.1:<port>/`` (static files: ETag, ranges)."""

    def __init__(self, root: Path, workdir: Path, max_ranges: int | None = None):
        self.root, self.workdir = Path(root), Path(workdir)
        self.max_ranges = max_ranges  # nginx's max_ranges: a request with more is answered 200, the whole file
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (w / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {w}/nginx.pid;\nerror_log {w}/error.log;\ndaemon off;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"  access_log off; client_body_temp_path {w}/body; proxy_temp_path {w}/proxy;\n"
            f"  fastcgi_temp_path {w}/fcgi; uwsgi_temp_path {w}/uwsgi; scgi_temp_path {w}/scgi;\n"
            "  default_type application/octet-stream; keepalive_requests 100000;\n"
            f"  server {{ listen 127.0.0.1:{self.port}; root {self.root};"
            + (f" max_ranges {self.max_ranges};" if self.max_ranges is not None else "")
            + " }\n"
            "}\n"
        )
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", str(w), "-c", str(w / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_up(self.url + "/", self.proc, "nginx")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            self.proc.wait(timeout=30)
        self.proc = None


class _ServerProcess:
    """A server process this module started: ``_launch`` starts it on ``self.port`` and waits until
    ``probe`` answers; ``stop()`` terminates it and waits."""

    proc: subprocess.Popen | None = None

    def _launch(self, cmd: list[str], probe: str, what: str) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_up(probe, self.proc, what)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


class MotoS3(_ServerProcess):
    """moto's S3 server (``moto[server]``) at ``http://127.0.0.1:<port>``; :meth:`env` points s3fs at it."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        self._launch(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            self.endpoint + "/moto-api/",
            "moto server",
        )
        return self

    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


class TcpProxy:
    """A loopback TCP forwarder to ``target_port``: stopping it takes the endpoint away from clients
    while the server behind it (moto, which keeps its objects only in memory) keeps running."""

    def __init__(self, target_port: int, delay_s: float = 0.0):
        self.target_port = target_port
        self.delay_s = delay_s  # added before each chunk a client sends is passed on: a network's latency
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> "TcpProxy":
        import threading

        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def _accept(self, srv: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b, delay in ((client, upstream, self.delay_s), (upstream, client, 0.0)):
                threading.Thread(target=self._pipe, args=(a, b, delay), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, delay: float = 0.0) -> None:
        try:
            while data := a.recv(65536):
                if delay:
                    time.sleep(delay)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self._conns = []


class GcsEmulator(_ServerProcess):
    """``gcp-storage-emulator`` (PyPI) at ``http://127.0.0.1:<port>``; :meth:`env` points gcsfs at it
    (``STORAGE_EMULATOR_HOST``: gcsfs then talks to it without credentials)."""

    def __init__(self, workdir: Path):
        self.workdir, self.port = Path(workdir), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> "GcsEmulator":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._launch(
            [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "-d",
                str(self.workdir),
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--in-memory",
            ],
            self.endpoint + "/storage/v1/b",
            "gcp-storage-emulator",
        )
        return self

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}


AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's fixed, published development account key (devstoreaccount1): not a secret."""


def azurite_binary() -> str | None:
    """``azurite-blob`` from ``npm install azurite`` (on PATH, or under $AZURITE_HOME/node_modules/.bin)."""
    home = os.environ.get("AZURITE_HOME", "")
    local = Path(home) / "node_modules" / ".bin" / "azurite-blob" if home else None
    return shutil.which("azurite-blob") or (str(local) if local is not None and local.exists() else None)


class Azurite(_ServerProcess):
    """Azurite's blob service (npm ``azurite``) at ``http://127.0.0.1:<port>/devstoreaccount1``;
    :meth:`env` gives adlfs its connection string."""

    def __init__(self, workdir: Path):
        self.workdir, self.port = Path(workdir), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/devstoreaccount1"

    def start(self) -> "Azurite":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._launch(
            [
                azurite_binary(),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(self.workdir),
                "--silent",
                "--skipApiVersionCheck",
            ],
            self.endpoint + "?comp=list",
            "azurite",
        )
        return self

    def env(self) -> dict:
        return {
            "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint};"
        }
