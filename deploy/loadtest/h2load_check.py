"""h2load against the gateway's Check with a pre-framed gRPC body, checking the bytes.

h2load (Debian package nghttp2-client) speaks plain HTTP/2, so the request is sent as
gRPC is on the wire: POST /copyfree.v1.GatewayService/Check, content-type
application/grpc, te: trailers, and a body that is one length-prefixed CheckRequest
(flag byte 0, 4-byte big-endian length, message). h2load cannot read gRPC trailers,
and a failed gRPC call is still HTTP 200, so the check is on the response bytes:

1. one reference call with the Python gRPC client gives the size of a good answer
   (the same image always gets the same answer; the request id is 16 hex characters);
2. h2load sends N requests; every one must be a 2xx, and the DATA received must be
   exactly N framed answers of that size. A gRPC error answers with trailers only (no
   DATA), so any failure shows up as missing bytes.

    .venv/bin/python deploy/loadtest/h2load_check.py --image some.jpg -n 2000 -c 8
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from copyfree.v1 import gateway_pb2, gateway_pb2_grpc

CHECK_PATH = "/copyfree.v1.GatewayService/Check"


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class H2loadResult:
    requests: int
    succeeded: int
    status_2xx: int
    data_bytes: int
    rps: float
    output: str


def parse_h2load(output: str) -> H2loadResult:
    """The numbers of h2load's summary that the check needs."""

    def grab(pattern: str) -> str:
        m = re.search(pattern, output)
        if m is None:
            raise ValueError(f"h2load output lacks {pattern!r}:\n{output}")
        return m.group(1)

    return H2loadResult(
        requests=int(grab(r"requests: (\d+) total")),
        succeeded=int(grab(r"(\d+) succeeded")),
        status_2xx=int(grab(r"status codes: (\d+) 2xx")),
        data_bytes=int(grab(r"traffic: .*?\((\d+)\) data")),
        rps=float(grab(r"finished in [^,]+, ([\d.]+) req/s")),
        output=output,
    )


def reference_answer_bytes(address: str, request: bytes, token: str | None) -> int:
    """Framed size of a good answer to `request` (one call through gRPC)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply: gateway_pb2.CheckResponse = stub.Check(
            gateway_pb2.CheckRequest.FromString(request), timeout=30, metadata=metadata
        )
    return len(frame(reply.SerializeToString()))


def run_h2load(
    address: str,
    request: bytes,
    *,
    total: int,
    clients: int,
    streams: int = 1,
    token: str | None = None,
    h2load: str = "h2load",
) -> H2loadResult:
    """h2load's result for `total` Check calls of `request` (serialized)."""
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if token:
        headers += ["-H", f"authorization: Bearer {token}"]
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "check.grpc"
        body.write_bytes(frame(request))
        proc = subprocess.run(
            [h2load, "-n", str(total), "-c", str(clients), "-m", str(streams),
             *headers, "-d", str(body), f"http://{address}{CHECK_PATH}"],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
    return parse_h2load(proc.stdout)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateway", default="127.0.0.1:50050")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("-n", "--requests", type=int, default=1000)
    p.add_argument("-c", "--clients", type=int, default=8, help="connections")
    p.add_argument("-m", "--streams", type=int, default=1, help="per connection")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--token", default=os.environ.get("COPYFREE_TOKEN"))
    ns = p.parse_args(argv)
    h2load = shutil.which("h2load")
    if h2load is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    request = gateway_pb2.CheckRequest(
        image=ns.image.read_bytes(), top_n=ns.top_n
    ).SerializeToString()
    expected = ns.requests * reference_answer_bytes(ns.gateway, request, ns.token)
    result = run_h2load(
        ns.gateway, request, total=ns.requests, clients=ns.clients,
        streams=ns.streams, token=ns.token, h2load=h2load,
    )  # fmt: skip
    _out(result.output)
    ok = (
        result.succeeded == result.status_2xx == ns.requests
        and result.data_bytes == expected
    )
    _out(
        f"{'OK' if ok else 'FAILED'}: {result.succeeded}/{ns.requests} succeeded, "
        f"{result.data_bytes} response bytes (expected {expected}), "
        f"{result.rps:.1f} req/s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
