"""The real `llamba serve` as a subprocess on 127.0.0.1 (port 0), and HTTP helpers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123"
START_TIMEOUT = 120.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]
    log_path: Path
    api_key: str | None = None
    health_seen: list[int] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        m = re.match(r"http://([^:/]+):(\d+)", self.url)
        assert m, self.url
        return m.group(1), int(m.group(2))

    def client(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("timeout", 300)
        kw.setdefault("api_key", self.api_key or "none")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, **kw)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        timeout: float = 300,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one HTTP request; never raises for a status."""
        headers = {"Content-Type": "application/json"}
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        status, _, raw = self.request("POST", path, body, **kw)
        return status, json.loads(raw)

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics (labelled ones under their full text)."""
        status, _, raw = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in raw.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def connection(self) -> http.client.HTTPConnection:
        host, port = self.host_port
        return http.client.HTTPConnection(host, port, timeout=300)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        return self.proc.returncode


def start_server(*args: str, api_key: str | None = API_KEY, wait: bool = True) -> Server:
    """Start `llamba serve --port 0 ARGS`, read its URL, wait until /health is 200."""
    log = Path(tempfile.mkstemp(prefix="llamba-serve-", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "llamba_cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--flash-attn",
        "on",
        *(["--api-key", api_key] if api_key else []),
        *args,
    ]
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ.copy()
        )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.wait(30)
        raise RuntimeError(f"llamba serve did not start ({proc.returncode}):\n{log.read_text()}")
    server = Server(url=url, proc=proc, log_path=log, api_key=api_key)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"llamba serve exited ({server.proc.returncode}):\n{server.log()}")
        try:
            status, _, _ = server.request("GET", "/health", auth=False, timeout=5)
        except OSError:
            status = 0
        server.health_seen.append(status)
        if status == 200:
            return
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"llamba serve not healthy after {timeout:.0f}s:\n{server.log()}")
