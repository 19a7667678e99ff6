"""`copyfree load`: a gRPC load generator that reports what ghz reports.

C workers share N connections and call one RPC back to back for a duration (or a total
count), cycling through real image payloads; the report has count, total time,
requests/s, fastest/average/slowest, the latency distribution (10..99 %), and the status
code and error distributions, as text or as ghz's JSON (durations in nanoseconds).

Calls: `check` / `recommend` (gateway), `encode` (encoder), `detect` / `similar` (one
index shard, keys computed by the encoder before the clock starts), and `direct-check`:
what the gateway does for a Check, done by the client against encoder and every shard
(encode -> detect on all shards -> decide -> encode + similar when unverified). Check
vs direct-check at the same concurrency is the gateway's added latency.

With `--stack` it first starts a local stack (`copyfree serve` in-process), registers
images from `--images`, runs every (call, concurrency) pair and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from copyfree.serving.server import channel_options
from copyfree.v1 import (
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    index_pb2,
    index_pb2_grpc,
)

CALLS = ("check", "recommend", "encode", "detect", "similar", "direct-check")
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
DETECTION = encoder_pb2.ENCODE_OUTPUT_DETECTION
DETECTION_TRIMMED = encoder_pb2.ENCODE_OUTPUT_DETECTION_TRIMMED
RETRIEVAL = encoder_pb2.ENCODE_OUTPUT_RETRIEVAL


@dataclass(frozen=True)
class Target:
    gateway: str = "127.0.0.1:50050"
    encoder: str = "127.0.0.1:50051"
    index: tuple[str, ...] = ("127.0.0.1:50061", "127.0.0.1:50062")  # serve --shards 2
    token: str | None = None
    ca_file: Path | None = None
    server_name: str = ""
    registry: str = "registry"
    copyright_free: str = "copyright-free"
    top_n: int = 10


@dataclass(frozen=True)
class RunSpec:
    call: str
    concurrency: int = 8
    duration_s: float = 10.0
    total: int = 0  # > 0: stop after this many calls (else after duration_s)
    connections: int = 1
    timeout_s: float = 20.0
    warmup_s: float = 1.0


@dataclass
class Report:
    """One run, in ghz's terms."""

    name: str
    concurrency: int
    count: int = 0
    total_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    status_codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.count / self.total_s if self.total_s > 0 else 0.0

    def percentile_s(self, p: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(self.latencies_s, p, method="linear"))

    @property
    def error_count(self) -> int:
        return self.count - self.status_codes.get("OK", 0)

    def summary(self) -> str:
        lat = self.latencies_s
        ms = 1000.0
        lines = [
            "Summary:",
            f"  Name:         {self.name}",
            f"  Count:        {self.count}",
            f"  Total:        {self.total_s:.2f} s",
            f"  Slowest:      {max(lat, default=0) * ms:.2f} ms",
            f"  Fastest:      {min(lat, default=0) * ms:.2f} ms",
            f"  Average:      {(sum(lat) / len(lat) if lat else 0) * ms:.2f} ms",
            f"  Requests/sec: {self.rps:.2f}",
            f"  Client CPU:   {self.client_cpu_s:.2f} s",
            "",
            "Latency distribution:",
            *(f"  {p} % in {self.percentile_s(p) * ms:.2f} ms" for p in PERCENTILES),
            "",
            "Status code distribution:",
            *(f"  [{c}]   {n} responses" for c, n in self.status_codes.most_common()),
        ]
        if self.errors:
            lines += ["", "Error distribution:"]
            lines += [f"  [{n}]   {msg}" for msg, n in self.errors.most_common(10)]
        return "\n".join(lines)

    def ghz_json(self) -> dict[str, Any]:
        """ghz's JSON report fields (durations in nanoseconds)."""
        ns = 1e9
        lat = self.latencies_s
        return {
            "name": self.name,
            "count": self.count,
            "total": int(self.total_s * ns),
            "average": int((sum(lat) / len(lat) if lat else 0) * ns),
            "fastest": int(min(lat, default=0) * ns),
            "slowest": int(max(lat, default=0) * ns),
            "rps": self.rps,
            "latencyDistribution": [
                {"percentage": p, "latency": int(self.percentile_s(p) * ns)}
                for p in PERCENTILES
            ]
            if lat
            else [],
            "statusCodeDistribution": dict(self.status_codes),
            "errorDistribution": dict(self.errors),
            "options": {"concurrency": self.concurrency},
        }


# ---- payloads -----------------------------------------------------------------------


def read_images(folder: Path, limit: int, offset: int = 0) -> list[bytes]:
    """Up to `limit` images of `folder` from `offset`, in the order `copyfree register`
    uses (by id), so `--payload-offset` picks registered or unregistered images."""
    from copyfree.folders import scan_folder

    records = scan_folder(folder)[offset : offset + limit]
    if not records:
        raise SystemExit(f"no images under {folder} (offset {offset})")
    return [Path(r.path).read_bytes() for r in records]


@dataclass(frozen=True)
class Keys:
    """What the encoder says about one payload (for index-only calls)."""

    detection: common_pb2.DetectionKeys
    detection_model: common_pb2.ModelRef
    retrieval: common_pb2.RetrievalCode
    retrieval_model: common_pb2.ModelRef


# ---- calls ---------------------------------------------------------------------------

Call = Callable[[int], Awaitable[None]]


class Client:
    """Channels, stubs and the per-call functions of one run."""

    def __init__(self, target: Target, spec: RunSpec, images: Sequence[bytes]) -> None:
        self.target, self.spec, self.images = target, spec, list(images)
        self._channels: list[grpc.aio.Channel] = []
        self.keys: list[Keys] = []
        self.thresholds = common_pb2.Thresholds(
            max_hamming=12, min_cosine=0.9, fallback_k=16
        )
        md = []
        if target.token:
            md.append(("authorization", f"Bearer {target.token}"))
        self.metadata = tuple(md)

    def channel(self, address: str, i: int = 0) -> grpc.aio.Channel:
        """Connection i (of spec.connections) to address. Distinct channel args keep
        gRPC from sharing one subchannel (one TCP connection) between them."""
        options = [*channel_options(MAX_MESSAGE_BYTES), ("copyfree.load.conn", i)]
        if self.target.ca_file is None:
            ch = grpc.aio.insecure_channel(address, options=options)
        else:
            if self.target.server_name:
                options.append(
                    ("grpc.ssl_target_name_override", self.target.server_name)
                )
            creds = grpc.ssl_channel_credentials(self.target.ca_file.read_bytes())
            ch = grpc.aio.secure_channel(address, creds, options=options)
        self._channels.append(ch)
        return ch

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    def _kw(self) -> dict[str, Any]:
        return {"timeout": self.spec.timeout_s, "metadata": self.metadata}

    async def prepare(self) -> None:
        """Learn the bundle's thresholds (direct-check decides like the gateway) and,
        for index-only calls, encode every payload once."""
        if self.spec.call not in ("detect", "similar", "direct-check"):
            return
        stub = encoder_pb2_grpc.EncoderServiceStub(self.channel(self.target.encoder))
        info = await stub.ModelInfo(encoder_pb2.ModelInfoRequest(), **self._kw())
        for m in info.models:
            if m.kind == "detection" and m.HasField("thresholds"):
                self.thresholds = m.thresholds
        if self.spec.call == "direct-check":
            return  # it encodes live, as the gateway does
        for image in self.images:
            e = (
                await stub.Encode(
                    encoder_pb2.EncodeRequest(
                        image=image, outputs=[DETECTION, RETRIEVAL]
                    ),
                    **self._kw(),
                )
            ).encoding
            self.keys.append(
                Keys(e.detection, e.detection_model, e.retrieval, e.retrieval_model)
            )

    def calls(self) -> list[Call]:
        """One call function per connection; call(i) sends payload i."""
        return [self._make_call(c) for c in range(self.spec.connections)]

    def _make_call(self, conn: int) -> Call:
        t, kw, name = self.target, self._kw(), self.spec.call
        n = len(self.images)
        if name in ("check", "recommend"):
            gw = gateway_pb2_grpc.GatewayServiceStub(self.channel(t.gateway, conn))
            if name == "check":

                async def check(i: int) -> None:
                    req = gateway_pb2.CheckRequest(
                        image=self.images[i % n], top_n=t.top_n
                    )
                    await gw.Check(req, **kw)

                return check

            async def recommend(i: int) -> None:
                req = gateway_pb2.RecommendRequest(
                    image=self.images[i % n], top_n=t.top_n
                )
                await gw.Recommend(req, **kw)

            return recommend
        enc = encoder_pb2_grpc.EncoderServiceStub(self.channel(t.encoder, conn))
        if name == "encode":

            async def encode(i: int) -> None:
                req = encoder_pb2.EncodeRequest(
                    image=self.images[i % n], outputs=[DETECTION]
                )
                await enc.Encode(req, **kw)

            return encode
        shards = [
            index_pb2_grpc.IndexServiceStub(self.channel(a, conn)) for a in t.index
        ]
        if name == "detect":

            async def detect(i: int) -> None:
                await shards[0].Detect(self.detect_request(i), **kw)

            return detect
        if name == "similar":

            async def similar(i: int) -> None:
                await shards[0].Similar(self.similar_request(i), **kw)

            return similar
        return self._direct_check(enc, shards)

    def detect_request(self, i: int) -> index_pb2.DetectRequest:
        k = self.keys[i % len(self.keys)]
        return index_pb2.DetectRequest(
            collection=self.target.registry,
            model=k.detection_model,
            query=k.detection,
            max_hamming=self.thresholds.max_hamming,
            fallback_k=self.thresholds.fallback_k,
            max_candidates=100,
        )

    def similar_request(self, i: int) -> index_pb2.SimilarRequest:
        k = self.keys[i % len(self.keys)]
        return index_pb2.SimilarRequest(
            collection=self.target.copyright_free,
            model=k.retrieval_model,
            query=k.retrieval,
            top_n=self.target.top_n,
        )

    def _direct_check(
        self,
        enc: encoder_pb2_grpc.EncoderServiceStub,
        shards: list[index_pb2_grpc.IndexServiceStub],
    ) -> Call:
        from copyfree_gateway.decision import (
            Decision,
            decide,
            merge_similar,
            with_trimmed_view,
        )

        kw, t, n = self._kw(), self.target, len(self.images)

        second_outputs = [RETRIEVAL]
        if self.thresholds.trimmed_view:
            second_outputs.append(DETECTION_TRIMMED)

        async def encode(image: bytes, outputs: list[int]) -> encoder_pb2.Encoding:
            request = encoder_pb2.EncodeRequest(image=image, outputs=outputs)
            return (await enc.Encode(request, **kw)).encoding

        async def detect(
            model: common_pb2.ModelRef, keys: common_pb2.DetectionKeys
        ) -> Decision:
            detect = index_pb2.DetectRequest(
                collection=t.registry,
                model=model,
                query=keys,
                max_hamming=self.thresholds.max_hamming,
                fallback_k=self.thresholds.fallback_k,
                max_candidates=100,
            )
            replies = await asyncio.gather(*(s.Detect(detect, **kw) for s in shards))
            return decide(
                replies,
                self.thresholds,
                require_second_key=self.thresholds.require_second_key,
                background=keys.background,
            )

        async def direct_check(i: int) -> None:
            """The gateway's Check plan (GatewayServicer.Check), called directly."""
            image = self.images[i % n]
            e = await encode(image, [DETECTION])
            as_is = await detect(e.detection_model, e.detection)
            if as_is.matched is not None:
                return
            r = await encode(image, second_outputs)
            trimmed = None
            if r.HasField("trimmed_detection"):
                trimmed = await detect(e.detection_model, r.trimmed_detection)
            if with_trimmed_view(as_is, trimmed)[0].matched is not None:
                return
            similar = index_pb2.SimilarRequest(
                collection=t.copyright_free,
                model=r.retrieval_model,
                query=r.retrieval,
                top_n=t.top_n,
            )
            hits = await asyncio.gather(*(s.Similar(similar, **kw) for s in shards))
            merge_similar(hits, t.top_n)

        return direct_check


# ---- the run -------------------------------------------------------------------------


async def run(
    target: Target, spec: RunSpec, images: Sequence[bytes], name: str = ""
) -> Report:
    """Warm up, then spec.concurrency workers call back to back until the duration
    (or total) is reached; calls in flight at the end are waited for and counted."""
    if spec.call not in CALLS:
        raise ValueError(f"call must be one of {CALLS}, got {spec.call!r}")
    if spec.concurrency < 1 or spec.connections < 1:
        raise ValueError("concurrency and connections must be >= 1")
    if spec.total <= 0 and spec.duration_s <= 0:
        raise ValueError("give a duration or a total")
    client = Client(target, spec, images)
    report = Report(name or f"{spec.call} c={spec.concurrency}", spec.concurrency)
    try:
        await client.prepare()
        calls = client.calls()
        if spec.warmup_s > 0:
            await _drive(calls, spec, spec.warmup_s, 0, None)
        cpu0 = _cpu_s()
        start = time.perf_counter()
        await _drive(calls, spec, spec.duration_s, spec.total, report)
        report.total_s = time.perf_counter() - start
        report.client_cpu_s = _cpu_s() - cpu0
    finally:
        await client.close()
    return report


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _drive(
    calls: list[Call],
    spec: RunSpec,
    duration_s: float,
    total: int,
    report: Report | None,
) -> None:
    end = time.perf_counter() + duration_s
    issued = 0

    async def worker(w: int) -> None:
        nonlocal issued
        call = calls[w % len(calls)]
        while True:
            if total > 0 and issued >= total:
                return
            if total <= 0 and time.perf_counter() >= end:
                return
            i = issued
            issued += 1
            t0 = time.perf_counter()
            code, error = "OK", ""
            try:
                await call(i)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                error = f"{code}: {(e.details() or '')[:160]}"
            if report is not None:
                report.latencies_s.append(time.perf_counter() - t0)
                report.count += 1
                report.status_codes[code] += 1
                if error:
                    report.errors[error] += 1

    await asyncio.gather(*(worker(w) for w in range(spec.concurrency)))


# ---- command line --------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [s for s in (p.strip() for p in text.split(",")) if s]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--call", default="check", help=f"comma list of {', '.join(CALLS)}")
    p.add_argument(
        "-c", "--concurrency", default="8", help="workers; comma list for several runs"
    )
    p.add_argument("-z", "--duration", type=float, default=10.0, help="seconds per run")
    p.add_argument("-n", "--total", type=int, default=0, help="calls per run (0: -z)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--timeout", type=float, default=20.0, help="deadline per call, s")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument(
        "--rounds", type=int, default=1, help="repeat the calls, alternating, per -c"
    )
    p.add_argument("--gateway", default=Target.gateway)
    p.add_argument("--encoder", default=Target.encoder)
    p.add_argument("--index", default=",".join(Target.index), help="shard addresses")
    p.add_argument("--token", default=None, help="bearer token (or COPYFREE_TOKEN)")
    p.add_argument("--ca-file", type=Path, default=None, help="TLS: server CA (PEM)")
    p.add_argument("--server-name", default="", help="TLS name override")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--images", type=Path, default=Path("../shared/datasets/dev"))
    p.add_argument("--payloads", type=int, default=64, help="distinct images cycled")
    p.add_argument(
        "--payload-offset", type=int, default=0, help="skip this many images first"
    )
    p.add_argument("--json", type=Path, default=None, help="write ghz-style JSON here")
    stack = p.add_argument_group("--stack: start a local stack and register first")
    stack.add_argument("--stack", action="store_true")
    stack.add_argument("--shards", type=int, default=2)
    stack.add_argument("--detection-bundle", type=Path, default=None)
    stack.add_argument("--retrieval-bundle", type=Path, default=None)
    stack.add_argument("--register", type=int, default=200, help="registry images")
    stack.add_argument("--free", type=int, default=300, help="copyright-free images")
    stack.add_argument("--data-dir", type=Path, default=Path(".copyfree/load"))


def _row(r: Report) -> str:
    p = [r.percentile_s(q) * 1000 for q in (50, 90, 99)]
    return (
        f"| {r.name} | {r.concurrency} | {r.count} | {r.rps:.1f} | {p[0]:.1f} | "
        f"{p[1]:.1f} | {p[2]:.1f} | {max(r.latencies_s, default=0) * 1000:.1f} | "
        f"{', '.join(f'{c} {n}' for c, n in r.status_codes.most_common())} |"
    )


def gateway_overhead(reports: Sequence[Report]) -> dict[int, list[float]]:
    """Concurrency -> p50(check) / p50(direct-check) - 1 for each round in which both
    ran (rounds alternate check and direct-check, so slow drifts in background load
    hit both alike)."""
    out: dict[int, list[float]] = {}
    pending: dict[int, Report] = {}
    for r in reports:
        call = r.name.split(" ")[0]
        if not r.latencies_s:
            continue
        if call == "check":
            pending[r.concurrency] = r
        elif call == "direct-check" and r.concurrency in pending:
            gw = pending.pop(r.concurrency)
            ratio = gw.percentile_s(50) / r.percentile_s(50) - 1
            out.setdefault(r.concurrency, []).append(ratio)
    return out


def print_table(reports: Sequence[Report]) -> None:
    print("| run | c | count | rps | p50 ms | p90 ms | p99 ms | max ms | codes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(_row(r))
    for c, ratios in sorted(gateway_overhead(reports).items()):
        each = ", ".join(f"{x * 100:+.1f}%" for x in ratios)
        print(
            f"c={c}: gateway adds {float(np.median(ratios)) * 100:+.1f}% at p50 "
            f"(median of {len(ratios)} round(s): {each})"
        )


def main(argv: list[str]) -> int:
    import os

    parser = argparse.ArgumentParser(
        prog="copyfree load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    ns = parser.parse_args(argv)
    calls = _split(ns.call)
    bad = [c for c in calls if c not in CALLS]
    if bad or not calls:
        parser.error(f"--call: unknown {bad}; choose from {', '.join(CALLS)}")
    levels = [int(c) for c in _split(ns.concurrency)]
    target = Target(
        gateway=ns.gateway,
        encoder=ns.encoder,
        index=tuple(_split(ns.index)),
        token=ns.token or os.environ.get("COPYFREE_TOKEN") or None,
        ca_file=ns.ca_file,
        server_name=ns.server_name,
        top_n=ns.top_n,
    )
    if ns.stack:
        return _with_stack(ns, target, calls, levels)
    images = read_images(ns.images, ns.payloads, ns.payload_offset)
    reports = asyncio.run(_runs(target, calls, levels, ns, images))
    _emit(reports, ns.json)
    return 0 if all(r.error_count == 0 for r in reports) else 1


async def _runs(
    target: Target,
    calls: list[str],
    levels: list[int],
    ns: argparse.Namespace,
    images: list[bytes],
) -> list[Report]:
    reports = []
    plan = [(c, call) for c in levels for _ in range(ns.rounds) for call in calls]
    for c, call in plan:
        spec = RunSpec(
            call,
            concurrency=c,
            duration_s=ns.duration,
            total=ns.total,
            connections=ns.connections,
            timeout_s=ns.timeout,
            warmup_s=ns.warmup,
        )
        report = await run(target, spec, images)
        print(report.summary(), end="\n\n", flush=True)
        reports.append(report)
    return reports


def _emit(reports: list[Report], json_path: Path | None) -> None:
    if len(reports) > 1:
        print_table(reports)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        doc: Any = [r.ghz_json() for r in reports]
        json_path.write_text(json.dumps(doc[0] if len(doc) == 1 else doc, indent=2))


def _with_stack(
    ns: argparse.Namespace, target: Target, calls: list[str], levels: list[int]
) -> int:
    import dataclasses

    from copyfree.folders import scan_folder
    from copyfree_cli.client import gateway_stub, register_records
    from copyfree_cli.stack import LocalStack, StackConfig

    records = scan_folder(ns.images)
    need = ns.register + ns.free
    if len(records) < need:
        raise SystemExit(f"{ns.images}: {len(records)} images, --stack needs {need}")
    config = StackConfig(
        detection_bundle=ns.detection_bundle or Path("models/detect-lite0"),
        retrieval_bundle=ns.retrieval_bundle or Path("models/retrieve-tbh16"),
        shards=ns.shards,
        data_dir=ns.data_dir,
    )
    with LocalStack.on_free_ports(config) as stack:
        stub = gateway_stub(stack.gateway_addr)
        register_records(stub, records[: ns.register], "registry", "registry")
        register_records(
            stub, records[ns.register : need], "copyright-free", "copyright-free"
        )
        target = dataclasses.replace(
            target,
            gateway=stack.gateway_addr,
            encoder=stack.encoder_addr,
            index=tuple(stack.index_addrs()),
        )
        # Payloads: registered images (the common, detection-only Check) unless an
        # offset past the registered ones is asked for.
        images = read_images(ns.images, ns.payloads, ns.payload_offset)
        reports = asyncio.run(_runs(target, calls, levels, ns, images))
    _emit(reports, ns.json)
    return 0 if all(r.error_count == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
