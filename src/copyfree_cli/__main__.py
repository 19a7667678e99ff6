"""`copyfree` command line. Heavy modules (torch, onnxruntime) are imported only by the
subcommands that need them, so `copyfree check` starts fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

DEFAULT_GATEWAY = "127.0.0.1:50050"
DEFAULT_DETECTION_BUNDLE = Path("models/detect-lite0")
DEFAULT_RETRIEVAL_BUNDLE = Path("models/retrieve-tbh16")


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a config dataclass (types from its annotations)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        required = (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        default = None if required else f.default
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default
            )
        elif kind in (int, float, str, Path):
            parser.add_argument(flag, type=kind, default=default, required=required)


def _config_from(cls: type, ns: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names and v is not None})


def _train_configs() -> dict[str, tuple[type, Any]]:
    from copyfree_train.train_detect import DetectTrainConfig, train_detection
    from copyfree_train.train_retrieve import RetrieveTrainConfig, train_retrieval

    return {
        "detect": (DetectTrainConfig, train_detection),
        "retrieve": (RetrieveTrainConfig, train_retrieval),
    }


def cmd_train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="copyfree train")
    # Not dest="model": the detection config has a `model` field (cvae or lite0).
    sub = parser.add_subparsers(dest="task", required=True)
    configs = _train_configs()
    for name, (cls, _) in configs.items():
        _add_dataclass_args(sub.add_parser(name, help=f"train the {name} model"), cls)
    ns = parser.parse_args(argv)
    cls, fn = configs[ns.task]
    result = fn(_config_from(cls, ns))
    print(f"checkpoint: {result}")
    return 0


def cmd_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="copyfree export")
    sub = parser.add_subparsers(dest="model", required=True)
    d = sub.add_parser("detect", help="detection checkpoint -> detection bundle")
    d.add_argument("--checkpoint", type=Path, required=True)
    d.add_argument(
        "--images", type=Path, required=True, help="images theta is taken over"
    )
    d.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    r = sub.add_parser("retrieve", help="TBH checkpoint -> retrieval bundle")
    r.add_argument("--checkpoint", type=Path, required=True)
    r.add_argument("--out", type=Path, default=DEFAULT_RETRIEVAL_BUNDLE)
    ns = parser.parse_args(argv)
    if ns.model == "detect":
        from copyfree_train.export_detect import export_detection_bundle

        out = export_detection_bundle(ns.checkpoint, ns.images, ns.out)
    else:
        from copyfree_train.export_retrieve import export_retrieval_bundle

        out = export_retrieval_bundle(ns.checkpoint, ns.out)
    print(f"bundle: {out}")
    return 0


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=2, help="index shards (processes)")
    p.add_argument("--detection-bundle", type=Path, default=DEFAULT_DETECTION_BUNDLE)
    p.add_argument("--retrieval-bundle", type=Path, default=DEFAULT_RETRIEVAL_BUNDLE)
    p.add_argument("--data-dir", type=Path, default=Path(".copyfree"))
    p.add_argument("--redis-url", default="", help="empty: embedded Redis in data-dir")


def _raise_keyboard_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_serve(argv: list[str]) -> int:
    from copyfree_cli.stack import LocalStack, StackConfig

    parser = argparse.ArgumentParser(prog="copyfree serve")
    _stack_args(parser)
    parser.add_argument("--gateway-port", type=int, default=50050)
    parser.add_argument("--encoder-port", type=int, default=50051)
    parser.add_argument("--index-base-port", type=int, default=50061)
    ns = parser.parse_args(argv)
    config = StackConfig(
        detection_bundle=ns.detection_bundle,
        retrieval_bundle=ns.retrieval_bundle,
        shards=ns.shards,
        data_dir=ns.data_dir,
        redis_url=ns.redis_url,
        gateway_port=ns.gateway_port,
        encoder_port=ns.encoder_port,
        index_base_port=ns.index_base_port,
    )
    with LocalStack(config) as stack:
        print(
            f"copyfree serving: gateway {stack.gateway_addr}, encoder "
            f"{stack.encoder_addr}, shards {stack.index_addrs()}, "
            f"redis {stack.redis_url}"
            f"\nlogs in {config.data_dir / 'logs'}; Ctrl-C stops everything",
            flush=True,
        )
        # SIGTERM (systemd, kill, a supervisor) stops the children like Ctrl-C does,
        # instead of orphaning them on their ports.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            stack.wait()
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway host:port")
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file with the bearer token (default: $COPYFREE_TOKEN if set)",
    )
    p.add_argument("--ca-file", type=Path, default=None, help="TLS: server CA (PEM)")
    p.add_argument("--cert-file", type=Path, default=None, help="mTLS: client cert")
    p.add_argument("--key-file", type=Path, default=None, help="mTLS: client key")
    p.add_argument("--server-name", default="", help="TLS: name on the server cert")


def _connection(ns: argparse.Namespace) -> Any:
    """The gateway connection from _connection_args; the token is never a flag (it
    would show in `ps` and shell history)."""
    import os

    from copyfree_cli.client import Connection

    token = (
        ns.token_file.read_text().strip()
        if ns.token_file is not None
        else os.environ.get("COPYFREE_TOKEN") or None
    )
    return Connection(
        ns.gateway, token, ns.ca_file, ns.cert_file, ns.key_file, ns.server_name
    )


def cmd_register(argv: list[str]) -> int:
    from copyfree.folders import scan_folder
    from copyfree_cli.client import KINDS, gateway_stub, register_records

    parser = argparse.ArgumentParser(prog="copyfree register")
    parser.add_argument(
        "images", type=Path, help="folder of images (manifest.csv optional)"
    )
    parser.add_argument("--collection", required=True)
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--offset", type=int, default=0, help="skip this many (by id)")
    parser.add_argument(
        "--limit", type=int, default=None, help="register at most this many"
    )
    _connection_args(parser)
    ns = parser.parse_args(argv)
    records = scan_folder(ns.images)[ns.offset :]
    records = records[: ns.limit] if ns.limit is not None else records
    reply = register_records(
        gateway_stub(_connection(ns)), records, ns.collection, ns.kind
    )
    print(
        f"registered {reply.registered} into {reply.collection} "
        f"({reply.replaced} replaced, {len(reply.failures)} failed; "
        f"model {reply.model.version})"
    )
    for f in reply.failures[:20]:
        print(f"  failed {f.id}: {f.code}: {f.message}")
    return 0 if not reply.failures else 1


def cmd_check(argv: list[str]) -> int:
    from google.protobuf import json_format

    from copyfree_cli.client import check_image, gateway_stub
    from copyfree_cli.report import render_check

    parser = argparse.ArgumentParser(prog="copyfree check")
    parser.add_argument("image", type=Path)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the raw answer")
    _connection_args(parser)
    ns = parser.parse_args(argv)
    reply = check_image(
        gateway_stub(_connection(ns)), ns.image.read_bytes(), top_n=ns.top_n
    )
    if ns.json:
        print(json.dumps(json_format.MessageToDict(reply), indent=2))
    else:
        print(render_check(reply, label=str(ns.image)))
    return 0


def cmd_stats(argv: list[str]) -> int:
    from google.protobuf import json_format

    from copyfree.v1 import gateway_pb2
    from copyfree_cli.client import gateway_stub

    parser = argparse.ArgumentParser(prog="copyfree stats")
    _connection_args(parser)
    ns = parser.parse_args(argv)
    reply = gateway_stub(_connection(ns)).Stats(
        gateway_pb2.GatewayStatsRequest(), timeout=30
    )
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
    return 0


def cmd_demo(argv: list[str]) -> int:
    from copyfree_cli.demo import run_demo

    parser = argparse.ArgumentParser(prog="copyfree demo")
    _stack_args(parser)
    parser.add_argument("--images", type=Path, default=Path("../shared/datasets/dev"))
    parser.add_argument("--registry-size", type=int, default=300)
    parser.add_argument("--free-size", type=int, default=700)
    ns = parser.parse_args(argv)
    return run_demo(ns)


def cmd_load(argv: list[str]) -> int:
    from copyfree_cli.load import main as load_main

    return load_main(argv)


def cmd_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="copyfree eval")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser(
        "retrieve", add_help=False, help="retrieval mAP report (TBH vs baselines)"
    )
    sub.add_parser(
        "detect", add_help=False, help="detection report (attacks, 1:N, baselines)"
    )
    ns, rest = parser.parse_known_args(argv[:1])
    if ns.what == "retrieve":
        from copyfree_train.eval_retrieve import main as eval_retrieve

        return eval_retrieve(argv[1:])
    if ns.what == "detect":
        from copyfree_train.eval_detect import main as eval_detect

        return eval_detect(argv[1:])
    return 2


def cmd_calibrate(argv: list[str]) -> int:
    from copyfree_train.calibrate import main as calibrate_main

    return calibrate_main(argv)


def cmd_background(argv: list[str]) -> int:
    from copyfree_train.background_bank import main as background_main

    return background_main(argv)


COMMANDS = {
    "train": cmd_train,
    "export": cmd_export,
    "serve": cmd_serve,
    "register": cmd_register,
    "check": cmd_check,
    "stats": cmd_stats,
    "demo": cmd_demo,
    "load": cmd_load,
    "eval": cmd_eval,
    "calibrate": cmd_calibrate,
    "background": cmd_background,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: copyfree {" + ",".join(COMMANDS) + "} ...")
        print("  train    train a detection model (CVAE, lite0) or the retrieval TBH")
        print("  export   export a checkpoint to a model bundle (ONNX + manifest)")
        print(
            "  serve    run encoder, index shards, gateway (+ embedded Redis) locally"
        )
        print("  register register a folder of images into a collection")
        print("  check    is this image registered? verdict with evidence")
        print("  stats    items per shard and collection")
        print("  demo     the whole detect-then-recommend path on real images")
        print("  load     load-test Check (gateway) against encoder+index direct")
        print("  eval     quality reports (eval retrieve, eval detect)")
        print("  calibrate  detection thresholds for a target false-match rate")
        print("  background a detection bundle's bank of unregistered images")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import grpc

    try:
        return COMMANDS[argv[0]](argv[1:])
    except grpc.RpcError as e:  # a status from the gateway: say it, no traceback
        code = e.code() if isinstance(e, grpc.Call) else None
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        name = code.name if code is not None else "ERROR"
        print(f"copyfree {argv[0]}: {name}: {details}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"copyfree {argv[0]}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
