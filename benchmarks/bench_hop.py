"""The floor under the gateway's overhead: what one gRPC round trip costs in Python on
this machine, with no work behind it.

    python benchmarks/bench_hop.py            # prints a markdown table

A grpc.aio server in its own process serves the standard health service; the client
calls Check (an empty request, a one-field answer) in sequence and as pairs in flight
(the gateway's fan-out to two shards), once with grpc.aio and once with the sync stubs
(`.future()` for the pairs). The gateway adds at least one such hop to every Check,
plus its own three calls out instead of the caller's; see docs/benchmarks.md, Load.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import platform
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

CALLS = 3000
WARMUP = 200
ROUNDS = 3
REQUEST = health_pb2.HealthCheckRequest()


def _serve(port_out: mp.Queue) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(
            health.aio.HealthServicer(), server
        )
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def _aio(address: str) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(WARMUP):
            await stub.Check(REQUEST)
        t = time.perf_counter()
        for _ in range(CALLS):
            await stub.Check(REQUEST)
        one = (time.perf_counter() - t) / CALLS
        t = time.perf_counter()
        for _ in range(CALLS // 2):
            await asyncio.gather(stub.Check(REQUEST), stub.Check(REQUEST))
        pair = (time.perf_counter() - t) / (CALLS // 2)
    return one, pair


def _sync(address: str) -> tuple[float, float]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(WARMUP):
            stub.Check(REQUEST)
        t = time.perf_counter()
        for _ in range(CALLS):
            stub.Check(REQUEST)
        one = (time.perf_counter() - t) / CALLS
        t = time.perf_counter()
        for _ in range(CALLS // 2):
            a, b = stub.Check.future(REQUEST), stub.Check.future(REQUEST)
            a.result()
            b.result()
        pair = (time.perf_counter() - t) / (CALLS // 2)
    return one, pair


def main() -> None:
    ports: mp.Queue = mp.Queue()
    server = mp.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    address = f"127.0.0.1:{ports.get(timeout=30)}"
    best: dict[str, tuple[float, float]] = {}
    try:
        for _ in range(ROUNDS):  # alternate the clients; keep each one's best round
            for name, run in (
                ("grpc.aio", lambda: asyncio.run(_aio(address))),
                ("sync stubs", lambda: _sync(address)),
            ):
                one, pair = run()
                prev = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(prev[0], one), min(prev[1], pair))
    finally:
        server.terminate()
    lines = [
        f"{platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, {CALLS} calls, "
        f"best of {ROUNDS} rounds",
        "",
        "| client | one call, ms | two calls in flight, ms |",
        "|---|---:|---:|",
    ]
    for name, (one, pair) in best.items():
        lines.append(f"| {name} | {one * 1e3:.3f} | {pair * 1e3:.3f} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
