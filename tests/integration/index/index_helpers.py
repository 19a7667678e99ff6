"""Request builders and process helpers for the index integration tests (imported by
the test modules)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import redis

from copyfree.v1 import common_pb2, index_pb2
from copyfree_index.embedded_redis import (
    RedisProcess,
    redis_executable,
    start_redis,
)

CVAE = common_pb2.ModelRef(name="cvae", version="1.0.0")
TBH = common_pb2.ModelRef(name="tbh", version="1.0.0")
REGISTRY = common_pb2.COLLECTION_KIND_REGISTRY
COPYRIGHT_FREE = common_pb2.COLLECTION_KIND_COPYRIGHT_FREE


def random_keys(rng: np.random.Generator) -> common_pb2.DetectionKeys:
    return common_pb2.DetectionKeys(
        first_key=rng.integers(0, 256, 8, dtype=np.uint8).tobytes(),
        second_key=rng.integers(-2000, 2000, 64).astype("<i2").tobytes(),
    )


def near_copy(
    keys: common_pb2.DetectionKeys, bits: int, rng: np.random.Generator
) -> common_pb2.DetectionKeys:
    """The same keys with `bits` first-key bits flipped and a little noise on k2."""
    b = np.unpackbits(np.frombuffer(keys.first_key, np.uint8))
    b[rng.choice(64, bits, replace=False)] ^= 1
    k2 = np.frombuffer(keys.second_key, "<i2").astype(np.int32) + rng.integers(
        -20, 20, 64
    )
    return common_pb2.DetectionKeys(
        first_key=np.packbits(b).tobytes(), second_key=k2.astype("<i2").tobytes()
    )


def random_code(
    rng: np.random.Generator, bits: int = 16, fine: int = 16
) -> common_pb2.RetrievalCode:
    return common_pb2.RetrievalCode(
        code=rng.integers(0, 256, bits // 8, dtype=np.uint8).tobytes(),
        code_bits=bits,
        fine=rng.integers(-128, 128, fine).astype(np.int8).tobytes(),
    )


def registry_item(
    item_id: str, keys: common_pb2.DetectionKeys, title: str = ""
) -> index_pb2.IndexItem:
    return index_pb2.IndexItem(
        id=item_id,
        keys=keys,
        metadata=common_pb2.WorkMetadata(
            title=title or f"work {item_id}", owner="KOLAA", licence="KOLAA registry"
        ),
    )


def free_item(item_id: str, code: common_pb2.RetrievalCode) -> index_pb2.IndexItem:
    return index_pb2.IndexItem(
        id=item_id,
        code=code,
        metadata=common_pb2.WorkMetadata(title=item_id, licence="CC0"),
    )


class ShardProcess:
    """`python -m copyfree_index`, JSON logs in a file; learns its port from them."""

    def __init__(self, redis_url: str, log_path: Path, **env: str) -> None:
        full_env = {
            **os.environ,
            "INDEX_HOST": "127.0.0.1",
            "INDEX_PORT": "0",
            "INDEX_SHARD_ID": "0",
            "INDEX_NUM_SHARDS": "1",
            "INDEX_REDIS_URL": redis_url,
            "INDEX_REDIS_WAIT_S": "10",
            **env,
        }
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "copyfree_index"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def messages(self) -> list[str]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                out.append(json.loads(line)["message"])
        return out

    def port(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.messages():
                if "listening on port" in message:
                    return int(message.split("listening on port ")[1].split()[0])
            assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise TimeoutError(self.log_path.read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(20)
        self._log.close()
        return code


def cluster_binary() -> str | None:
    """A redis-server >= 6 (cluster mode with the commands used here), or None."""
    try:
        binary = redis_executable()
    except FileNotFoundError:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    version = out.split("v=")[1].split()[0] if "v=" in out else "0"
    return binary if int(version.split(".")[0]) >= 6 else None


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[list[int]]:
    """A local Redis Cluster of `masters` nodes on loopback ports (no replicas):
    slots split evenly with CLUSTER ADDSLOTS, nodes joined with CLUSTER MEET."""
    binary = cluster_binary()
    assert binary is not None
    ports, procs = [], []
    try:
        for i in range(masters):
            port = _cluster_port(ports)
            node_dir = directory / f"node{i}"
            node_dir.mkdir(parents=True)
            procs.append(
                subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--dir", str(node_dir), "--appendonly", "yes",
                     "--logfile", "redis.log", "--save", ""],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            ports.append(port)
        clients = [redis.Redis(port=p, socket_timeout=5) for p in ports]
        for c in clients:
            _wait(lambda c=c: c.ping())
        bounds = np.linspace(0, 16384, masters + 1).astype(int)
        for c, a, b in zip(clients, bounds[:-1], bounds[1:], strict=True):
            c.execute_command("CLUSTER ADDSLOTS", *range(int(a), int(b)))
        for p in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", p)
        _wait(lambda: all(_ready(c, masters) for c in clients))
        for c in clients:
            c.close()
        yield ports
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(20)


def _cluster_port(taken: list[int]) -> int:
    """A loopback port p with p and p + 10000 (the cluster bus) both free; the OS's
    ephemeral picks are often above 55535, where the bus port does not exist."""
    rng = np.random.default_rng()
    for _ in range(200):
        port = int(rng.integers(20_000, 30_000))
        if port in taken:
            continue
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _ready(client: redis.Redis, masters: int) -> bool:
    info = _cluster_info(client)
    return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(
        masters
    )


def _wait(check, timeout_s: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError("redis did not get ready")
        time.sleep(0.05)


def restart_redis(old: RedisProcess) -> RedisProcess:
    """A new redis-server on the old one's port and data directory (AOF replayed)."""
    return start_redis(old.data_dir, port=old.port)
