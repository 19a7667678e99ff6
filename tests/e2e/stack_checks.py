"""The end-to-end scenario, run against a LocalStack (real processes: encoder, index
shards, gateway, Redis) with whichever model bundles the caller built."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from copyfree.folders import ImageRecord, scan_folder
from copyfree.v1 import gateway_pb2, gateway_pb2_grpc
from copyfree_cli.client import check_image, gateway_stub, register_records
from copyfree_cli.stack import LocalStack, StackConfig
from tests.utils.images import encode, make_picture

REGISTERED = 40
FREE = 30
TOP_N = 5


def write_images(folder: Path, seeds: range) -> list[ImageRecord]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for s in seeds:
        path = folder / f"img-{s:03d}.png"
        path.write_bytes(encode(make_picture(s, (200, 150)), "PNG"))
        records.append(ImageRecord(path, f"img-{s:03d}", ""))
    return records


def jpeg_copy_of(path: Path, quality: int = 75) -> bytes:
    from PIL import Image

    return encode(Image.open(path).convert("RGB"), "JPEG", quality=quality)


def wait_gateway_sees_all_shards(
    stub: gateway_pb2_grpc.GatewayServiceStub, timeout_s: float
) -> None:
    """Stats fans out to every shard: it succeeds once the gateway reaches them all."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = stub.Stats(gateway_pb2.GatewayStatsRequest(), timeout=5)
            if all(s.ready for s in reply.shards):
                return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def scenario_images(tmp_path: Path) -> tuple[Path, Path]:
    """(registry folder, copyright-free folder with 3 label sub-folders)."""
    write_images(tmp_path / "registry", range(REGISTERED))
    for part in range(3):
        start = 1000 + part * (FREE // 3)
        write_images(
            tmp_path / "free" / f"label{part}", range(start, start + FREE // 3)
        )
    return tmp_path / "registry", tmp_path / "free"


def run_scenario(
    tmp_path: Path, detection_bundle: Path, retrieval_bundle: Path
) -> None:
    registry_dir, free_dir = scenario_images(tmp_path)
    registry = scan_folder(registry_dir)
    free = scan_folder(free_dir)
    unregistered = write_images(tmp_path / "other", range(5000, 5001))[0]
    config = StackConfig(
        detection_bundle=detection_bundle,
        retrieval_bundle=retrieval_bundle,
        shards=2,
        data_dir=tmp_path / "state",
        ready_timeout_s=120,
    )
    with LocalStack.on_free_ports(config) as stack:
        stub = gateway_stub(stack.gateway_addr)
        reg = register_records(stub, registry, "registry", "registry", progress=False)
        assert reg.registered == REGISTERED and not reg.failures
        fr = register_records(
            stub, free, "copyright-free", "copyright-free", progress=False
        )
        assert fr.registered == FREE

        target = registry[7]
        queries = {
            "original": target.path.read_bytes(),
            "jpeg": jpeg_copy_of(target.path),
            "unregistered": unregistered.path.read_bytes(),
        }
        before = {k: check_image(stub, v, top_n=TOP_N) for k, v in queries.items()}
        assert before["original"].verdict == gateway_pb2.VERDICT_REGISTERED
        assert before["original"].match.id == target.item_id
        assert before["original"].match.hamming == 0
        assert before["jpeg"].verdict == gateway_pb2.VERDICT_REGISTERED, before["jpeg"]
        assert before["jpeg"].match.id == target.item_id
        unv = before["unregistered"]
        assert unv.verdict == gateway_pb2.VERDICT_UNVERIFIED, unv.evidence
        assert len(unv.recommendations) == TOP_N
        assert [r.rank for r in unv.recommendations] == list(range(1, TOP_N + 1))
        assert all(r.collection == "copyright-free" for r in unv.recommendations)
        assert unv.evidence.searched == REGISTERED and unv.evidence.shards == 2

        stack.kill_index_shards()
        with pytest.raises(grpc.RpcError) as err:
            check_image(stub, queries["original"], timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # fails closed
        stack.restart_index_shards()
        wait_gateway_sees_all_shards(stub, timeout_s=15)

        after = {k: check_image(stub, v, top_n=TOP_N) for k, v in queries.items()}
        for k in queries:
            a, b = before[k], after[k]
            assert a.verdict == b.verdict and a.match == b.match, k
            assert list(a.recommendations) == list(b.recommendations), k
            assert a.evidence.searched == b.evidence.searched, k
