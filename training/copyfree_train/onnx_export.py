"""Torch module -> ONNX model bundle, with the parity check every bundle must pass.

Bundles ship weights as float16 initializers (cast to float32 inside the graph; ONNX
Runtime folds the casts at load), halving their size. The torch module's weights are
rounded to float16 first, so the exported graph computes the same function as the torch
module that the parity check compares it with.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from copyfree.bundle import INPUT_NAME, MODEL_FILE, Manifest, write_manifest

OPSET = 17
_MIN_COMPRESSED_ELEMENTS = 1024  # small tensors (biases, theta) stay float32


@dataclass(frozen=True)
class ParityReport:
    max_abs_error: dict[str, float]
    identical: dict[str, bool]
    images: int
    # Integer outputs made by rounding a float: values that differ by the allowed
    # tolerance because torch and ONNX Runtime landed on either side of a .5 boundary.
    rounding_ties: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "images": self.images,
            "max_abs_error": self.max_abs_error,
            "identical": self.identical,
            "rounding_ties": self.rounding_ties,
        }


def round_weights_to_fp16(module: torch.nn.Module) -> None:
    """In place: every float parameter and buffer becomes exactly fp16-representable."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dtype == torch.float32 and t.numel() >= _MIN_COMPRESSED_ELEMENTS:
                t.copy_(t.half().float())


def _store_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Large float32 initializers -> float16 initializer + Cast node (same values)."""
    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < _MIN_COMPRESSED_ELEMENTS:
            continue
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr):
            continue  # not exactly representable: keep float32 rather than change it
        name = init.name
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(half, name + "__fp16"))
        casts.append(
            helper.make_node(
                "Cast", [name + "__fp16"], [name], to=onnx.TensorProto.FLOAT
            )
        )
    for i, node in enumerate(casts):
        graph.node.insert(i, node)
    return model


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    output_names: Sequence[str],
) -> onnx.ModelProto:
    """Trace module(images) -> outputs, dynamic batch axis, fp16-stored weights."""
    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter notice; chosen on purpose
        torch.onnx.export(
            module,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes={
                INPUT_NAME: {0: "batch"},
                **{name: {0: "batch"} for name in output_names},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    model = _store_fp16(onnx.load_from_string(buf.getvalue()))
    onnx.checker.check_model(model, full_check=True)
    return model


def check_parity(
    module: torch.nn.Module,
    model: onnx.ModelProto,
    images: np.ndarray,
    output_names: Sequence[str],
    *,
    float_atol: float = 1e-4,
    rounded: Mapping[str, int] | None = None,
) -> ParityReport:
    """Run torch and ONNX Runtime on the same preprocessed images; float outputs must
    agree within float_atol and integer outputs (keys, codes) must be identical.

    rounded: integer outputs computed as round(scale * float), with the largest
    difference allowed there (1): a float difference of 1e-6 can move a value across a
    .5 boundary, so exact identity would fail by chance (about 1 value in 500 for
    round(1000 z)). Such values are counted and reported, never silently accepted."""
    module.eval()
    with torch.no_grad():
        want = [t.numpy() for t in module(torch.from_numpy(images))]
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(list(output_names), {INPUT_NAME: images})
    errors, identical, ties = {}, {}, {}
    rounded = dict(rounded or {})
    for name, g, w in zip(output_names, got, want, strict=True):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise AssertionError(
                f"output {name}: onnx {g.dtype}{g.shape} vs torch {w.dtype}{w.shape}"
            )
        errors[name] = (
            float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
        )
        identical[name] = bool(np.array_equal(g, w))
        if np.issubdtype(g.dtype, np.floating):
            if errors[name] > float_atol:
                raise AssertionError(
                    f"output {name}: max abs error {errors[name]:.2e} > {float_atol}"
                )
        elif name in rounded:
            gap = np.abs(g.astype(np.int64) - w.astype(np.int64))
            if gap.max(initial=0) > rounded[name]:
                raise AssertionError(
                    f"output {name}: differs by up to {gap.max()} (allowed "
                    f"{rounded[name]} at rounding boundaries)"
                )
            ties[name] = int(np.count_nonzero(gap))
        elif not identical[name]:
            diff = int(np.sum(g != w))
            raise AssertionError(
                f"output {name}: {diff} values differ between onnx and torch"
            )
    return ParityReport(errors, identical, len(images), ties)


def write_bundle(
    bundle_dir: Path,
    model: onnx.ModelProto,
    manifest: Manifest,
    parity: ParityReport,
) -> Path:
    """bundle_dir/model.onnx + manifest.json (parity numbers recorded in it)."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    helper.set_model_props(
        model,
        {
            "copyfree.manifest": json.dumps(manifest.to_dict(), sort_keys=True),
        },
    )
    onnx.save(model, str(bundle_dir / MODEL_FILE))
    extra = dict(manifest.extra)
    extra["parity"] = parity.to_dict()
    write_manifest(bundle_dir, replace(manifest, extra=extra))
    return bundle_dir
