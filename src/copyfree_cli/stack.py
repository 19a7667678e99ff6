"""Run the whole service stack locally as separate processes: embedded Redis (unless a
URL is given), the encoder, S index shards and the gateway, each on a loopback port."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENCODER_SERVICE = "copyfree.v1.EncoderService"
INDEX_SERVICE = "copyfree.v1.IndexService"
GATEWAY_SERVICE = "copyfree.v1.GatewayService"


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (all held open while choosing, so they
    differ; another process may still take one before we bind: fine locally)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_serving(address: str, service: str, timeout_s: float) -> None:
    """Block until the service's health is SERVING at address."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{service} at {address} not SERVING in {timeout_s:.0f}s"
                )
            time.sleep(0.2)


@dataclass
class StackConfig:
    detection_bundle: Path
    retrieval_bundle: Path
    shards: int = 2
    data_dir: Path = Path(".copyfree")
    redis_url: str = ""  # "" = start an embedded Redis with AOF under data_dir
    gateway_port: int = 50050
    encoder_port: int = 50051
    index_base_port: int = 50061  # shard i listens on index_base_port + i ...
    index_ports: tuple[int, ...] = ()  # ... unless ports are listed here
    log_level: str = "INFO"
    ready_timeout_s: float = 180.0
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}
        self._redis: Any = None
        self.redis_url = config.redis_url

    @property
    def gateway_addr(self) -> str:
        return f"127.0.0.1:{self.config.gateway_port}"

    @property
    def encoder_addr(self) -> str:
        return f"127.0.0.1:{self.config.encoder_port}"

    def index_port(self, shard_id: int) -> int:
        c = self.config
        return (
            c.index_ports[shard_id] if c.index_ports else c.index_base_port + shard_id
        )

    def index_addrs(self) -> list[str]:
        return [f"127.0.0.1:{self.index_port(i)}" for i in range(self.config.shards)]

    @classmethod
    def on_free_ports(cls, config: StackConfig) -> LocalStack:
        """A stack whose every service listens on a currently free loopback port."""
        gateway, encoder, *shards = free_ports(2 + config.shards)
        return cls(
            dataclasses.replace(
                config,
                gateway_port=gateway,
                encoder_port=encoder,
                index_ports=tuple(shards),
            )
        )

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, name: str, module: str, env: dict[str, str]) -> None:
        log_dir = self.config.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        self._logs[name] = log_path
        full_env = {**os.environ, **self.config.extra_env, **env}
        with log_path.open("ab") as log:
            self._procs[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            from copyfree_index.embedded_redis import start_redis

            self._redis = start_redis(c.data_dir / "redis")
            self.redis_url = self._redis.url
        common = {"PYTHONUNBUFFERED": "1"}
        self._spawn(
            "encoder",
            "copyfree_encoder",
            {
                **common,
                "ENCODER_HOST": "127.0.0.1",
                "ENCODER_PORT": str(c.encoder_port),
                "ENCODER_DETECTION_BUNDLE": str(c.detection_bundle),
                "ENCODER_RETRIEVAL_BUNDLE": str(c.retrieval_bundle),
                "ENCODER_LOG_LEVEL": c.log_level,
            },
        )
        for i in range(c.shards):
            self._spawn(f"index-{i}", "copyfree_index", self._index_env(i))
        self._spawn(
            "gateway",
            "copyfree_gateway",
            {
                **common,
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(c.gateway_port),
                "GATEWAY_ENCODER_ADDR": self.encoder_addr,
                "GATEWAY_INDEX_ADDRS": json.dumps(self.index_addrs()),
                "GATEWAY_LOG_LEVEL": c.log_level,
            },
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        targets = [("encoder", self.encoder_addr, ENCODER_SERVICE)]
        targets += [
            (f"index-{i}", a, INDEX_SERVICE) for i, a in enumerate(self.index_addrs())
        ]
        targets.append(("gateway", self.gateway_addr, GATEWAY_SERVICE))
        deadline = time.monotonic() + self.config.ready_timeout_s
        for name, addr, service in targets:
            while True:
                proc = self._procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode}:\n"
                        f"{self.log_tail(name)}"
                    )
                try:
                    wait_serving(addr, service, timeout_s=2)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{name} not ready after "
                            f"{self.config.ready_timeout_s:.0f}s:\n"
                            f"{self.log_tail(name)}"
                        ) from None

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self._logs.get(name)
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def kill_index_shards(self) -> None:
        """SIGKILL every shard process (crash simulation)."""
        for name, proc in self._procs.items():
            if name.startswith("index-"):
                proc.kill()
                proc.wait()

    def restart_index_shards(self) -> None:
        for i in range(self.config.shards):
            if self._procs[f"index-{i}"].poll() is not None:
                self._spawn(f"index-{i}", "copyfree_index", self._index_env(i))
        for addr in self.index_addrs():
            wait_serving(addr, INDEX_SERVICE, self.config.ready_timeout_s)

    def _index_env(self, shard_id: int) -> dict[str, str]:
        c = self.config
        return {
            "PYTHONUNBUFFERED": "1",
            "INDEX_HOST": "127.0.0.1",
            "INDEX_PORT": str(self.index_port(shard_id)),
            "INDEX_SHARD_ID": str(shard_id),
            "INDEX_NUM_SHARDS": str(c.shards),
            "INDEX_REDIS_URL": self.redis_url,
            "INDEX_LOG_LEVEL": c.log_level,
        }

    def wait(self) -> None:
        """Block until any child exits (or KeyboardInterrupt)."""
        while all(p.poll() is None for p in self._procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in self._procs.items() if p.poll() is not None]
        raise RuntimeError(f"{', '.join(dead)} exited:\n{self.log_tail(dead[0])}")

    def stop(self) -> None:
        """SIGTERM children (graceful: NOT_SERVING, then drain), SIGKILL stragglers."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
