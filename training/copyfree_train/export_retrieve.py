"""Retrieval checkpoint (TBH head) + its backbone -> one ONNX model bundle.

Owns: the served retrieval graph, images (n,3,224,224) -> "code" uint8 (n, B/8),
bits = logits > 0 packed MSB-first, and "fine" int8 (n, F) = round(127 * fine), the
tie-break vector (see copyfree_train.tbh.RetrievalHead); its parity check; the manifest.

Parity: the graph is exported once with two extra float outputs (logits, fine before
quantisation). A copy keeping only those is checked with onnx_export.check_parity
(float outputs within 1e-4); the bundle copy keeps only code/fine, and its code must be
identical to torch's and to copyfree.codes.pack_bits(logits > 0). The int8 fine vector
is allowed to differ by 1 where torch and ONNX Runtime land on opposite sides of a
rounding boundary (a float difference of 1e-6 can do that); this does not change the
ordering it exists for, and the count is recorded in the manifest.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from copyfree.bundle import INPUT_NAME, RETRIEVAL_OUTPUTS, Manifest
from copyfree.codes import pack_bits
from copyfree.preprocess import to_input
from copyfree_train.backbone import Backbone, build_backbone
from copyfree_train.data import load_rgb, scan_folder
from copyfree_train.onnx_export import (
    ParityReport,
    check_parity,
    export_onnx,
    round_weights_to_fp16,
    write_bundle,
)
from copyfree_train.tbh import RetrievalHead, pack_code, quantise_fine
from copyfree_train.train_retrieve import load_checkpoint

log = logging.getLogger(__name__)

FLOAT_OUTPUTS = ("logits", "fine_float")
PARITY_IMAGES = 8


class RetrievalGraph(nn.Module):
    """Backbone + hash head. with_float=True also returns the float values behind the
    integer outputs (export keeps them only in the parity copy of the graph)."""

    def __init__(
        self, backbone: Backbone, head: RetrievalHead, with_float: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.with_float = with_float

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, fine = self.head(self.backbone(images))
        code, fine8 = pack_code(logits), quantise_fine(fine)
        return (code, fine8, logits, fine) if self.with_float else (code, fine8)


class _FloatView(nn.Module):
    def __init__(self, graph: RetrievalGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, logits, fine = self.graph(images)
        return logits, fine


def _keep_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    """Copy of model whose graph outputs are only `names` (others stay internal)."""
    out = copy.deepcopy(model)
    keep = [o for o in out.graph.output if o.name in names]
    del out.graph.output[:]
    out.graph.output.extend(sorted(keep, key=lambda o: names.index(o.name)))
    onnx.checker.check_model(out, full_check=True)
    return out


def _weights_hash(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(init.raw_data or onnx.numpy_helper.to_array(init).tobytes())
    return h.hexdigest()[:10]


def parity_inputs(state: dict[str, Any], backbone: Backbone) -> np.ndarray:
    """Real images from the training folder when it is still there (queries, i.e. held
    out, first), else deterministic noise images in the input's value range."""
    images = Path(state["config"]["images"])
    try:
        records = scan_folder(images, limit=state["config"].get("limit"))
    except FileNotFoundError:
        records = []
    if records:
        step = max(1, len(records) // PARITY_IMAGES)
        chosen = records[::step][:PARITY_IMAGES]
        return np.stack([to_input(load_rgb(r.path), backbone.spec) for r in chosen])
    rng = np.random.default_rng(0)
    spec = backbone.spec
    return rng.uniform(-1, 1, (4, spec.channels, spec.size, spec.size)).astype(
        np.float32
    )


def check_retrieval_parity(
    graph: RetrievalGraph, model: onnx.ModelProto, images: np.ndarray
) -> ParityReport:
    """Float outputs within 1e-4 (check_parity), code identical to torch and to
    pack_bits(logits > 0), fine within 1 of torch. Raises AssertionError otherwise."""
    float_report = check_parity(
        _FloatView(graph), _keep_outputs(model, FLOAT_OUTPUTS), images, FLOAT_OUTPUTS
    )
    bundle = _keep_outputs(model, RETRIEVAL_OUTPUTS)
    session = ort.InferenceSession(
        bundle.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    code, fine = session.run(list(RETRIEVAL_OUTPUTS), {INPUT_NAME: images})
    with torch.no_grad():
        t_code, t_fine, t_logits, _ = (
            t.numpy() for t in graph(torch.from_numpy(images))
        )
    if code.dtype != np.uint8 or fine.dtype != np.int8:
        raise AssertionError(
            f"output dtypes {code.dtype}/{fine.dtype}, want uint8/int8"
        )
    if not np.array_equal(code, t_code):
        raise AssertionError(f"code: {int(np.sum(code != t_code))} bytes differ")
    if not np.array_equal(code, pack_bits(t_logits > 0)):
        raise AssertionError("code is not pack_bits(logits > 0)")
    fine_diff = np.abs(fine.astype(np.int32) - t_fine.astype(np.int32))
    if fine_diff.max(initial=0) > 1:
        raise AssertionError(f"fine differs by up to {fine_diff.max()} (allowed 1)")
    return ParityReport(
        max_abs_error={
            **float_report.max_abs_error,
            "code": 0.0,
            "fine": float(fine_diff.max(initial=0)),
        },
        identical={
            **float_report.identical,
            "code": True,
            "fine": bool(fine_diff.max(initial=0) == 0),
        },
        images=len(images),
    )


def export_retrieval_bundle(
    checkpoint: Path,
    out_dir: Path,
    *,
    images: np.ndarray | None = None,
    date: str | None = None,
    backbone_checkpoint: Path | None = None,
) -> Path:
    """Write out_dir/model.onnx + manifest.json from a train_retrieval checkpoint.

    images: preprocessed parity inputs (n,3,s,s); default: see parity_inputs.
    backbone_checkpoint: the backbone's local weights file when it has one (default:
    the path recorded at training; the weights' hash must match either way).
    """
    _, head, state = load_checkpoint(Path(checkpoint))
    backbone = build_backbone(
        state["backbone"], backbone_checkpoint or state.get("backbone_checkpoint")
    )
    recorded = state.get("backbone_weights")
    if recorded and recorded != backbone.weights_id():
        raise ValueError(
            f"checkpoint was trained on backbone weights {recorded}, "
            f"installed weights are {backbone.weights_id()}"
        )
    backbone.fuse_for_export()
    graph = RetrievalGraph(backbone, head, with_float=True).eval()
    # Before rounding: the codes the training evaluation saw, to count fp16 changes.
    parity = parity_inputs(state, backbone) if images is None else images
    with torch.no_grad():
        before = graph(torch.from_numpy(parity))[0].numpy()
    round_weights_to_fp16(graph)
    example = torch.from_numpy(parity[:2])
    full = export_onnx(graph, example, RETRIEVAL_OUTPUTS + FLOAT_OUTPUTS)
    report = check_retrieval_parity(graph, full, parity)
    with torch.no_grad():
        after = graph(torch.from_numpy(parity))[0].numpy()
    flipped = int(np.unpackbits(before ^ after).sum())
    model = _keep_outputs(full, RETRIEVAL_OUTPUTS)

    bits = int(state["tbh_config"]["bits"])
    day = date or dt.date.today().strftime("%Y%m%d")
    version = f"retrieve-tbh{bits}-{day}-{_weights_hash(model)}"
    evaluation = dict(state.get("evaluation", {}))
    test = evaluation.get("test", {})
    k = evaluation.get("k")
    manifest = Manifest(
        name=f"retrieve-tbh{bits}",
        version=version,
        kind="retrieval",
        preprocess=backbone.spec,
        code_bits=bits,
        fine_dim=head.fine_dim,
        extra={
            "backbone": {
                "name": backbone.name,
                "weights": backbone.weights_id(),
                "feature_dim": backbone.feature_dim,
                "source": backbone.source(),
            },
            "fine": {
                "kind": state["fine"]["kind"],
                "dim": head.fine_dim,
                "scale": float(state["fine"]["scale"]),
                "use": "order items tied in Hamming distance by cosine, descending",
            },
            "training": {
                "config": state["config"],
                "data": state["data"],
                "best_epoch": evaluation.get("best_epoch"),
                "steps": evaluation.get("steps"),
                "val_mAP": evaluation.get("val_map"),
            },
            "evaluation": {
                f"mAP@{k}": test.get("tbh", {}).get(f"mAP@{k}"),
                f"mAP@{k}_fine_tiebreak": test.get("tbh+fine", {}).get(f"mAP@{k}"),
                "k": k,
                "relevance": "same label (manifest.csv); unsorted/unlabelled queries "
                "not scored",
                "test": test,
                "fp16_rounding_code_bits_changed": {
                    "bits": flipped,
                    "of": int(before.size * 8),
                    "images": len(parity),
                },
            },
        },
    )
    write_bundle(Path(out_dir), model, manifest, report)
    log.info("bundle %s written to %s", version, out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        description="Export a retrieval checkpoint as a bundle."
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument(
        "--date", default=None, help="YYYYMMDD for the version (default today)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--backbone-checkpoint",
        type=Path,
        default=None,
        help="local backbone weights (vit_b16); default: the path used in training",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    export_retrieval_bundle(
        args.checkpoint,
        args.out,
        date=args.date,
        backbone_checkpoint=args.backbone_checkpoint,
    )


if __name__ == "__main__":
    main()
