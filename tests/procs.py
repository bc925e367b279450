"""Run the sidecar as a real subprocess (`python -m sidecar serve`) for lifecycle and crash tests."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SIDECAR_* (a developer's settings must not leak in), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


# argv: the file size limit, then the command to exec. SIGXFSZ ignored (the disposition
# survives exec): a write past the limit then fails with EFBIG instead of killing the child.
_LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
os.execv(sys.argv[2], sys.argv[2:])
"""


class SidecarProcess:
    """One `sidecar serve` child with its own ports; stderr goes to a log file for post-mortems."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.log_path = tmp / f"sidecar-{self.http_port}.log"
        defaults = {
            "SIDECAR_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
            "SIDECAR_GRPC_ADDR": f"127.0.0.1:{self.grpc_port}",
            "SIDECAR_ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
            "SIDECAR_STORE": f"sqlite:///{tmp}/sidecar.db",
            "SIDECAR_CHECK_RESPONSE_URL": "false",
            "SIDECAR_LOG_FORMAT": "json",
        }
        self.env = clean_env(**{**defaults, **env})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 20.0, *, file_size_limit: int | None = None) -> Self:
        """``file_size_limit``: the child cannot grow a file past that many bytes (as if the
        disk filled up there; ``resource.RLIM_INFINITY`` for no limit yet, one to set later
        with ``resource.prlimit``); ``grow_files`` lifts it."""
        command = [sys.executable, "-m", "sidecar", "serve"]
        if file_size_limit is not None:
            # Set by a launcher that then execs the sidecar (same pid), not by a preexec_fn:
            # Python code run between fork and exec in a parent with grpc's threads (pytest,
            # the soak) can deadlock or corrupt the child before it ever execs.
            command = [sys.executable, "-c", _LIMITED, str(file_size_limit), *command]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            if self.ready():
                return self
            time.sleep(0.05)
        raise AssertionError(f"sidecar not ready within {timeout}s:\n{self.log()}")

    def grow_files(self) -> None:
        """Lift the file size limit of a child started with one (space freed on the disk)."""
        assert self.proc is not None
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit code of a graceful drain."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what was committed."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
