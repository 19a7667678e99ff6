"""Tiny model bundles built with onnx.helper (no torch) for encoder, gateway, e2e tests.

Both models follow the bundle contract of copyfree.bundle (input "images", the kind's
output names and dtypes) and are perceptual the way block-average hashes are: a JPEG
q=50 re-encode of a generated picture (tests.utils.images) lands within about 2 bits of
the original, while unrelated generated pictures sit ~30 bits apart (min ~11 over 60).

- detection: (n,1,32,32) grayscale -> 2x2 average pool -> 16x16 = 256 cells -> remove
  the least-squares plane (gradients) -> L2 normalise -> fixed seeded Gaussian
  projection = embedding (n,64) float32, ~N(0,1) per dimension like a CVAE's mu.
  first_key = packed bits of embedding > theta (theta = 0, also stored in the manifest);
  second_key = int16(clip(round(1000 * embedding))) computed in float64, so both equal
  copyfree.codes.first_key / second_key of the embedding bit for bit.
- retrieval: (n,3,32,32) RGB -> 4x4 average pool -> 192 cells, centred, L2 normalised
  -> fixed seeded Gaussian projection to `bits` logits. code = packed sign bits
  (n, bits/8) uint8 MSB-first; fine = int8(clip(round(40 * logits))) (n, bits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from copyfree.bundle import MODEL_FILE, Manifest, Thresholds, write_manifest
from copyfree.preprocess import PreprocessSpec

OPSET = 18
IR_VERSION = 9  # readable by every onnxruntime the images may carry
INPUT_SIZE = 32
DET_GRID = 16  # detection pools 32x32 to 16x16 cells
RET_GRID = 8  # retrieval pools 32x32x3 to 8x8x3 cells
EMBEDDING_DIM = 64
FINE_SCALE = 40.0
DETECTION_NAME = "tiny-detection"
RETRIEVAL_NAME = "tiny-retrieval"
TINY_VERSION = "0.0.1-test"


def make_detection_bundle(
    directory: Path | str,
    *,
    version: str = TINY_VERSION,
    seed: int = 11,
    thresholds: Thresholds | None = None,
) -> Path:
    """Write model.onnx + manifest.json of the tiny detection model into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cells = DET_GRID * DET_GRID
    theta = np.zeros(EMBEDDING_DIM, dtype=np.float32)
    nodes = [
        _pool_node(INPUT_SIZE // DET_GRID),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "deplane"], ["residual"]),
        *_unit_norm_nodes("residual", "unit"),
        helper.make_node("MatMul", ["unit", "projection"], ["embedding"]),
        *_pack_bits_nodes("embedding", "theta", "first_key", EMBEDDING_DIM),
        helper.make_node("Cast", ["embedding"], ["emb64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["emb64", "k_scale"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "i16_min", "i16_max"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["second_key"], to=TensorProto.INT16),
    ]
    projection = np.random.default_rng(seed).standard_normal((cells, EMBEDDING_DIM))
    initializers = [
        numpy_helper.from_array(_deplane_matrix(DET_GRID), "deplane"),
        *_unit_norm_initializers(),
        numpy_helper.from_array(projection.astype(np.float32), "projection"),
        numpy_helper.from_array(theta, "theta"),
        *_pack_bits_initializers(EMBEDDING_DIM),
        numpy_helper.from_array(np.array(1000.0, dtype=np.float64), "k_scale"),
        numpy_helper.from_array(np.array(-32768.0, dtype=np.float64), "i16_min"),
        numpy_helper.from_array(np.array(32767.0, dtype=np.float64), "i16_max"),
    ]
    dim = EMBEDDING_DIM
    outputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim]),
        helper.make_tensor_value_info("first_key", TensorProto.UINT8, ["n", dim // 8]),
        helper.make_tensor_value_info("second_key", TensorProto.INT16, ["n", dim]),
    ]
    _save(out, "tiny_detection", nodes, initializers, channels=1, outputs=outputs)
    spec = PreprocessSpec(size=INPUT_SIZE, channels=1, mean=(0.5,), std=(0.5,))
    write_manifest(
        out,
        Manifest(
            name=DETECTION_NAME,
            version=version,
            kind="detection",
            preprocess=spec,
            code_bits=EMBEDDING_DIM,
            thresholds=thresholds or Thresholds(),
            extra={
                "theta": theta.tolist(),
                "training": {"note": "tiny test model", "projection_seed": seed},
            },
        ),
    )
    return out


def make_retrieval_bundle(
    directory: Path | str, bits: int = 16, *, version: str = TINY_VERSION, seed: int = 7
) -> Path:
    """Write model.onnx + manifest.json of the tiny retrieval model into `directory`."""
    if bits <= 0 or bits % 8:
        raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    features = 3 * RET_GRID * RET_GRID
    projection = np.random.default_rng(seed).standard_normal((features, bits))
    nodes = [
        _pool_node(INPUT_SIZE // RET_GRID),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat", "axis1"], ["flat_mean"], keepdims=1),
        helper.make_node("Sub", ["flat", "flat_mean"], ["centred"]),
        *_unit_norm_nodes("centred", "unit"),
        helper.make_node("MatMul", ["unit", "projection"], ["logits"]),
        *_pack_bits_nodes("logits", "zero", "code", bits),
        helper.make_node("Mul", ["logits", "fine_scale"], ["fine_scaled"]),
        helper.make_node("Round", ["fine_scaled"], ["fine_rounded"]),
        helper.make_node(
            "Clip", ["fine_rounded", "i8_min", "i8_max"], ["fine_clipped"]
        ),
        helper.make_node("Cast", ["fine_clipped"], ["fine"], to=TensorProto.INT8),
    ]
    initializers = [
        *_unit_norm_initializers(),
        numpy_helper.from_array(projection.astype(np.float32), "projection"),
        numpy_helper.from_array(np.zeros(bits, dtype=np.float32), "zero"),
        *_pack_bits_initializers(bits),
        numpy_helper.from_array(np.array(FINE_SCALE, dtype=np.float32), "fine_scale"),
        numpy_helper.from_array(np.array(-127.0, dtype=np.float32), "i8_min"),
        numpy_helper.from_array(np.array(127.0, dtype=np.float32), "i8_max"),
    ]
    outputs = [
        helper.make_tensor_value_info("code", TensorProto.UINT8, ["n", bits // 8]),
        helper.make_tensor_value_info("fine", TensorProto.INT8, ["n", bits]),
    ]
    _save(out, "tiny_retrieval", nodes, initializers, channels=3, outputs=outputs)
    spec = PreprocessSpec(
        size=INPUT_SIZE,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    write_manifest(
        out,
        Manifest(
            name=RETRIEVAL_NAME,
            version=version,
            kind="retrieval",
            preprocess=spec,
            code_bits=bits,
            fine_dim=bits,
            extra={"training": {"note": "tiny test model", "projection_seed": seed}},
        ),
    )
    return out


def _pool_node(kernel: int) -> onnx.NodeProto:
    return helper.make_node(
        "AveragePool", ["images"], ["pooled"], kernel_shape=[kernel, kernel],
        strides=[kernel, kernel],
    )  # fmt: skip


def _deplane_matrix(grid: int) -> NDArray[np.float32]:
    """(g*g, g*g) float32 M such that v @ M removes v's least-squares plane a*x+b*y+c.

    Generated pictures are gradients plus shapes; without this the gradient dominates
    and unrelated pictures share most of their bits."""
    yy, xx = np.mgrid[0:grid, 0:grid]
    a = np.stack([xx.ravel(), yy.ravel(), np.ones(grid * grid)], axis=1)
    plane = a @ np.linalg.pinv(a)  # symmetric projection onto the planes
    deplane: NDArray[np.float32] = (np.eye(grid * grid) - plane).astype(np.float32)
    return deplane


def _unit_norm_nodes(values: str, out: str) -> list[onnx.NodeProto]:
    """values / sqrt(sum(values^2) + eps): a blank image gives zeros, not NaN."""
    p = f"{out}_"
    return [
        helper.make_node("Mul", [values, values], [p + "sq"]),
        helper.make_node("ReduceSum", [p + "sq", "axis1"], [p + "sum"], keepdims=1),
        helper.make_node("Add", [p + "sum", "norm_eps"], [p + "sum_eps"]),
        helper.make_node("Sqrt", [p + "sum_eps"], [p + "norm"]),
        helper.make_node("Div", [values, p + "norm"], [out]),
    ]


def _unit_norm_initializers() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "norm_eps"),
    ]


def _pack_bits_nodes(
    values: str, threshold: str, out: str, bits: int
) -> list[onnx.NodeProto]:
    """values (n,bits) > threshold -> (n,bits/8) uint8, MSB-first like np.packbits."""
    p = f"{out}_"
    return [
        helper.make_node("Greater", [values, threshold], [p + "bits"]),
        helper.make_node("Cast", [p + "bits"], [p + "bitsf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [p + "bitsf", "pack_shape"], [p + "groups"]),
        helper.make_node("Mul", [p + "groups", "pack_weights"], [p + "weighted"]),
        helper.make_node(
            "ReduceSum", [p + "weighted", "axis2"], [p + "bytes"], keepdims=0
        ),
        helper.make_node("Cast", [p + "bytes"], [out], to=TensorProto.UINT8),
    ]


def _pack_bits_initializers(bits: int) -> list[onnx.TensorProto]:
    weights = (2.0 ** np.arange(7, -1, -1)).astype(np.float32)  # 128, 64, ..., 1
    return [
        numpy_helper.from_array(
            np.array([-1, bits // 8, 8], dtype=np.int64), "pack_shape"
        ),
        numpy_helper.from_array(weights, "pack_weights"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
    ]


def _save(
    out: Path,
    name: str,
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    *,
    channels: int,
    outputs: list[onnx.ValueInfoProto],
) -> None:
    inputs = [
        helper.make_tensor_value_info(
            "images", TensorProto.FLOAT, ["n", channels, INPUT_SIZE, INPUT_SIZE]
        )
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="copyfree-tests",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out / MODEL_FILE))
