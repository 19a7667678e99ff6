"""BundleModel checks, the tiny bundles' key contract, micro-batching and settings."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from copyfree import codes
from copyfree.bundle import MANIFEST_FILE, MODEL_FILE, read_manifest
from copyfree.errors import FailedPrecondition, Unavailable
from copyfree.preprocess import batch_inputs, decode
from copyfree_encoder import model as model_module
from copyfree_encoder.model import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    BundleError,
    BundleModel,
    EncodedImage,
    Encoder,
    MicroBatcher,
    resolve_providers,
)
from copyfree_encoder.settings import EncoderSettings
from tests.utils.images import make_image_bytes
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "detection": make_detection_bundle(root / "detection"),
        "retrieval": make_retrieval_bundle(root / "retrieval"),
    }


@pytest.fixture(scope="module")
def detection(bundles: dict[str, Path]) -> BundleModel:
    return BundleModel(bundles["detection"], providers="cpu")


@pytest.fixture(scope="module")
def retrieval(bundles: dict[str, Path]) -> BundleModel:
    return BundleModel(bundles["retrieval"], providers="cpu")


def _inputs(model: BundleModel, seeds: range) -> np.ndarray:
    images = [decode(make_image_bytes(seed)) for seed in seeds]
    return batch_inputs(images, model.spec)


def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


# --- the tiny bundles honour the key contract -------------------------------------


def test_detection_keys_equal_copyfree_codes_of_the_embedding(
    detection: BundleModel,
) -> None:
    out = detection.run(_inputs(detection, range(16)))
    theta = np.asarray(detection.manifest.extra["theta"], dtype=np.float32)

    assert out["embedding"].shape == (16, 64) and out["embedding"].dtype == np.float32
    assert np.array_equal(out["first_key"], codes.first_key(out["embedding"], theta))
    assert np.array_equal(out["second_key"], codes.second_key(out["embedding"]))
    assert out["second_key"].dtype == np.int16
    wire = codes.second_key_to_bytes(out["second_key"][0])
    assert len(wire) == 128
    assert np.array_equal(codes.second_key_from_bytes(wire), out["second_key"][0])


def test_detection_embedding_of_a_blank_image_is_zero_not_nan(
    detection: BundleModel,
) -> None:
    blank = np.zeros((1, *detection.input_shape), dtype=np.float32)
    out = detection.run(blank)
    assert np.isfinite(out["embedding"]).all()
    assert not out["second_key"].any()


def test_retrieval_code_is_the_sign_of_the_fine_vector(retrieval: BundleModel) -> None:
    out = retrieval.run(_inputs(retrieval, range(16)))
    assert out["code"].shape == (16, 2) and out["code"].dtype == np.uint8
    assert out["fine"].shape == (16, 16) and out["fine"].dtype == np.int8
    bits = codes.unpack_bits(out["code"], 16).astype(bool)
    decided = out["fine"] != 0  # zero fine values sit on the threshold
    assert np.array_equal(bits[decided], out["fine"][decided] > 0)


@pytest.mark.parametrize("bits", [32, 64])
def test_retrieval_bundles_of_other_widths(tmp_path: Path, bits: int) -> None:
    model = BundleModel(make_retrieval_bundle(tmp_path, bits=bits), providers="cpu")
    out = model.run(_inputs(model, range(3)))
    assert out["code"].shape == (3, bits // 8)
    assert out["fine"].shape == (3, bits)
    assert model.manifest.code_bits == bits


def test_model_reports_cpu_provider_and_counts_runs(bundles: dict[str, Path]) -> None:
    model = BundleModel(bundles["detection"], providers="auto")
    assert model.execution_provider in (CPU_PROVIDER, CUDA_PROVIDER)
    model.run(_inputs(model, range(3)))
    model.run(_inputs(model, range(1)))
    assert model.stats.runs == 2
    assert model.stats.batch_sizes == {3: 1, 1: 1}
    assert model.stats.largest_batch == 3


def test_run_rejects_inputs_of_the_wrong_shape(retrieval: BundleModel) -> None:
    with pytest.raises(ValueError, match="wants"):
        retrieval.run(np.zeros((1, 1, 32, 32), dtype=np.float32))


# --- bundles that must be refused at start ----------------------------------------


def test_refuses_a_graph_whose_outputs_do_not_match_the_kind(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = _copy_bundle(bundles["retrieval"], tmp_path / "b")
    _edit_manifest(bundle, kind="detection", code_bits=64, fine_dim=0)
    with pytest.raises(BundleError, match=r"detection graph must output.*missing"):
        BundleModel(bundle, providers="cpu")


def test_refuses_preprocess_that_does_not_fit_the_input(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = _copy_bundle(bundles["detection"], tmp_path / "b")
    spec = read_manifest(bundle).preprocess.to_dict()
    spec.update(channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    _edit_manifest(bundle, preprocess=spec)
    with pytest.raises(BundleError, match="input channels is 1"):
        BundleModel(bundle, providers="cpu")


def test_refuses_a_fixed_batch_dimension(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = _copy_bundle(bundles["retrieval"], tmp_path / "b")
    proto = onnx.load(str(bundle / MODEL_FILE))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(bundle / MODEL_FILE))
    with pytest.raises(BundleError, match="warm-up"):
        BundleModel(bundle, providers="cpu")


def test_refuses_code_bits_that_disagree_with_the_graph(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = _copy_bundle(bundles["retrieval"], tmp_path / "b")
    _edit_manifest(bundle, code_bits=32, fine_dim=32)
    with pytest.raises(BundleError, match="'code'"):
        BundleModel(bundle, providers="cpu")


def test_refuses_missing_files(bundles: dict[str, Path], tmp_path: Path) -> None:
    no_model = _copy_bundle(bundles["detection"], tmp_path / "no_model")
    (no_model / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match=MODEL_FILE):
        BundleModel(no_model, providers="cpu")
    with pytest.raises(BundleError, match=MANIFEST_FILE):
        BundleModel(tmp_path / "nowhere", providers="cpu")


def test_refuses_swapped_bundles(
    detection: BundleModel, retrieval: BundleModel
) -> None:
    with pytest.raises(BundleError, match="retrieval bundle, given as the detection"):
        Encoder(retrieval, detection)


def test_cuda_provider_requested_without_cuda_fails_clearly(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        model_module.ort, "get_available_providers", lambda: [CPU_PROVIDER]
    )
    with pytest.raises(BundleError, match="onnxruntime-gpu"):
        BundleModel(bundles["detection"], providers="cuda")


def test_provider_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        model_module.ort, "get_available_providers", lambda: [CPU_PROVIDER]
    )
    assert resolve_providers("auto") == [CPU_PROVIDER]
    monkeypatch.setattr(
        model_module.ort,
        "get_available_providers",
        lambda: [CUDA_PROVIDER, CPU_PROVIDER],
    )
    assert resolve_providers("auto") == [CUDA_PROVIDER, CPU_PROVIDER]
    assert resolve_providers("cuda") == [CUDA_PROVIDER, CPU_PROVIDER]
    assert resolve_providers("cpu") == [CPU_PROVIDER]


# --- Encoder and MicroBatcher -----------------------------------------------------


def test_missing_model_is_a_failed_precondition(detection: BundleModel) -> None:
    encoder = Encoder(detection, None)
    assert encoder.resolve_outputs() == {"detection"}
    with pytest.raises(FailedPrecondition, match="ENCODER_RETRIEVAL_BUNDLE"):
        encoder.resolve_outputs(["retrieval"])


def test_encode_images_runs_at_most_max_batch(bundles: dict[str, Path]) -> None:
    model = BundleModel(bundles["retrieval"], providers="cpu")
    encoder = Encoder(None, model, max_batch=4)
    results = encoder.encode_images([make_image_bytes(s) for s in range(10)])
    assert len(results) == 10 and all(isinstance(r, EncodedImage) for r in results)
    assert model.stats.batch_sizes == {4: 2, 2: 1}


async def test_micro_batcher_merges_concurrent_requests(
    bundles: dict[str, Path],
) -> None:
    det = BundleModel(bundles["detection"], providers="cpu")
    ret = BundleModel(bundles["retrieval"], providers="cpu")
    encoder = Encoder(det, ret, max_batch=8)
    kinds = encoder.resolve_outputs()
    items = [encoder.prepare(make_image_bytes(s), kinds) for s in range(20)]
    want = encoder.encode_images([make_image_bytes(s) for s in range(20)])
    det.stats.batch_sizes.clear()

    batcher = MicroBatcher(encoder, max_batch=8, wait_s=0.05)
    batcher.start()
    try:
        got = await asyncio.gather(*(batcher.submit(item) for item in items))
    finally:
        await batcher.aclose()

    assert sorted(det.stats.batch_sizes.elements()) == [4, 8, 8]
    for g, w in zip(got, want, strict=True):
        assert isinstance(w, EncodedImage)
        assert g.first_key == w.first_key and g.code == w.code and g.fine == w.fine
        assert g.second_key is not None and w.second_key is not None
        assert np.array_equal(g.second_key, w.second_key)
        assert g.embedding is not None and w.embedding is not None
        assert np.array_equal(g.embedding, w.embedding)


async def test_micro_batcher_refuses_work_once_closed(detection: BundleModel) -> None:
    encoder = Encoder(detection, None)
    batcher = MicroBatcher(encoder, max_batch=4, wait_s=0.001)
    item = encoder.prepare(make_image_bytes(1), frozenset({"detection"}))
    with pytest.raises(Unavailable):
        await batcher.submit(item)  # not started
    batcher.start()
    assert (await batcher.submit(item)).first_key is not None
    await batcher.aclose()
    with pytest.raises(Unavailable):
        await batcher.submit(item)


async def test_micro_batcher_fails_the_batch_when_the_model_fails(
    detection: BundleModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = Encoder(detection, None)
    item = encoder.prepare(make_image_bytes(1), frozenset({"detection"}))
    batcher = MicroBatcher(encoder, max_batch=4, wait_s=0.001)
    batcher.start()
    try:

        def boom(items: object) -> list[EncodedImage]:
            raise RuntimeError("model exploded")

        monkeypatch.setattr(encoder, "run_batch", boom)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(item)
        monkeypatch.undo()
        assert (await batcher.submit(item)).first_key is not None  # worker survived
    finally:
        await batcher.aclose()


# --- settings -----------------------------------------------------------------------


def test_settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ENCODER_DETECTION_BUNDLE", str(tmp_path / "d"))
    monkeypatch.setenv("ENCODER_MAX_BATCH", "4")
    monkeypatch.setenv("ENCODER_BATCH_WAIT_MS", "0.5")
    monkeypatch.setenv("ENCODER_PROVIDERS", "cpu")
    monkeypatch.setenv("ENCODER_PORT", "6000")
    settings = EncoderSettings()
    assert settings.detection_bundle == tmp_path / "d"
    assert settings.retrieval_bundle is None
    assert (settings.max_batch, settings.batch_wait_ms) == (4, 0.5)
    assert settings.providers == "cpu" and settings.port == 6000
    assert settings.max_image_bytes == 20 * 1024 * 1024
    assert settings.max_pixels == 40_000_000


def test_settings_defaults(tmp_path: Path) -> None:
    settings = EncoderSettings(retrieval_bundle=tmp_path)
    assert settings.port == 50051
    assert (settings.max_batch, settings.batch_wait_ms) == (32, 2.0)
    assert (settings.intra_op_threads, settings.providers) == (0, "auto")


def test_settings_need_a_bundle_and_a_known_provider(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("ENCODER_DETECTION_BUNDLE", "ENCODER_RETRIEVAL_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="ENCODER_DETECTION_BUNDLE"):
        EncoderSettings()
    with pytest.raises(ValidationError):
        EncoderSettings(detection_bundle=tmp_path, providers="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        EncoderSettings(detection_bundle=tmp_path, max_batch=0)
