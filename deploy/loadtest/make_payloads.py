"""Write ghz data files with real image payloads: Check requests from image files, and
Detect / Similar requests whose keys the running encoder computed from the same images.

    .venv/bin/python deploy/loadtest/make_payloads.py --images ../shared/datasets/dev \
        --count 32 --encoder 127.0.0.1:50051 --out artifacts/loadtest

Writes check.json, detect.json, similar.json (arrays of request messages in protobuf
JSON, bytes as base64: ghz sends them round-robin) and check.bin (one Check request,
gRPC-framed, for h2load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from google.protobuf import json_format

from copyfree.v1 import gateway_pb2
from copyfree_cli.load import Client, RunSpec, Target, read_images


def frame(message: bytes) -> bytes:
    """gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=Path("../shared/datasets/dev"))
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--offset", type=int, default=0, help="skip this many images")
    p.add_argument("--encoder", default="", help="encoder address: also Detect/Similar")
    p.add_argument("--token", default=os.environ.get("COPYFREE_TOKEN"))
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("artifacts/loadtest"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    images = read_images(ns.images, ns.count, ns.offset)
    checks = [gateway_pb2.CheckRequest(image=i, top_n=ns.top_n) for i in images]
    _write(ns.out / "check.json", checks)
    (ns.out / "check.bin").write_bytes(frame(checks[0].SerializeToString()))
    if ns.encoder:
        target = Target(encoder=ns.encoder, token=ns.token, top_n=ns.top_n)
        client = Client(target, RunSpec("detect"), images)
        asyncio.run(_prepare(client))
        n = len(images)
        _write(ns.out / "detect.json", [client.detect_request(i) for i in range(n)])
        _write(ns.out / "similar.json", [client.similar_request(i) for i in range(n)])
    sys.stdout.write(f"wrote {len(images)} payloads to {ns.out}\n")
    return 0


async def _prepare(client: Client) -> None:
    try:
        await client.prepare()
    finally:
        await client.close()


def _write(path: Path, messages: list) -> None:  # type: ignore[type-arg]
    docs = [
        json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages
    ]
    path.write_text(json.dumps(docs))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
