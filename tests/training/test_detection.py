"""Detection model: key head == copyfree.codes, training/serving preprocessing
identity, a tiny fit -> ONNX bundle -> parity, resume. Small generated images only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from PIL import Image, ImageDraw  # noqa: E402

from copyfree.bundle import DETECTION_OUTPUTS, INPUT_NAME, MODEL_FILE, read_manifest  # noqa: E402
from copyfree.codes import first_key, second_key  # noqa: E402
from copyfree.preprocess import decode, to_input  # noqa: E402
from copyfree_train.attacks import seed000_view as augment  # noqa: E402
from copyfree_train.cvae import CVAE, PREPROCESS, DetectionKeyHead  # noqa: E402
from copyfree_train.data import ImageCache, scan_folder  # noqa: E402
from copyfree_train.export_detect import export_detection_bundle  # noqa: E402
from copyfree_train.train_detect import (  # noqa: E402
    CONFIG_FILE,
    CURVE_FILE,
    LOSSES_FILE,
    DetectTrainConfig,
    inputs_for,
    train_detection,
)

pytestmark = pytest.mark.torch


def _make_images(folder: Path, count: int = 20) -> None:
    """Random ellipses and rectangles on gradients, as PNG and JPEG, odd sizes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        w, h = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, 3)
        base = (ramp + rng.integers(0, 128, 3)).clip(0, 255)
        im = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            box = [
                x0,
                y0,
                x0 + int(rng.integers(10, w // 2)),
                y0 + int(rng.integers(10, h // 2)),
            ]
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        im.save(folder / (f"im{i:02d}.png" if i % 2 else f"im{i:02d}.jpg"))


def _config(tmp: Path, **kw: object) -> DetectTrainConfig:
    base: dict[str, object] = {
        "images": tmp / "images",
        "out": tmp / "run",
        "epochs": 1,
        "batch_size": 8,
        "max_steps": 2,
        "holdout": 0.2,
        "seed": 3,
        "threads": 2,
    }
    return DetectTrainConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("detect")
    _make_images(tmp / "images")
    return tmp, train_detection(_config(tmp))


class _FixedEncoder(torch.nn.Module):
    """Stands in for the encoder: returns chosen embeddings, to hit edge cases."""

    def __init__(self, mu: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mu", torch.from_numpy(mu))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.mu[: x.shape[0]]


def test_key_head_matches_codes_on_edge_cases() -> None:
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 0.3, 64).astype(np.float32)
    mu = rng.normal(0, 2, (6, 64)).astype(np.float32)
    mu[1] = theta  # equal to theta: bit 0 (strictly greater)
    mu[2] = np.nextafter(theta, np.float32(np.inf))  # just above: bit 1
    mu[3, :8] = [
        0.0005,
        -0.0005,
        0.0015,
        0.0025,
        1.2345,
        -2.5e-4,
        1e9,
        -1e9,
    ]  # ties, saturation
    mu[4] = np.float32(0.0125) + np.arange(64, dtype=np.float32) * np.float32(0.001)
    head = DetectionKeyHead(_FixedEncoder(mu), theta).eval()
    emb, k1, k2 = (t.numpy() for t in head(torch.zeros(6, 1, 128, 128)))
    assert k1.dtype == np.uint8 and k1.shape == (6, 8)
    assert k2.dtype == np.int16 and k2.shape == (6, 64)
    np.testing.assert_array_equal(emb, mu)
    np.testing.assert_array_equal(k1, first_key(mu, theta))
    np.testing.assert_array_equal(k2, second_key(mu))


def test_augment_is_deterministic_and_keeps_rgb() -> None:
    im = Image.new("RGB", (90, 70), (200, 30, 30))
    ImageDraw.Draw(im).ellipse([10, 10, 60, 50], fill=(0, 0, 255))
    views = [augment(im, np.random.default_rng(s)) for s in (1, 1, 2)]
    assert all(v.mode == "RGB" for v in views)
    assert np.array_equal(np.asarray(views[0]), np.asarray(views[1]))
    assert not np.array_equal(np.asarray(views[0]), np.asarray(views[2]))


def test_training_input_is_the_serving_input(trained: tuple[Path, Path]) -> None:
    tmp, _ = trained
    records = scan_folder(tmp / "images")
    cache = ImageCache(records)
    train_tensors = inputs_for([cache[i] for i in range(len(cache))], None)
    for record, tensor in zip(records, train_tensors, strict=True):
        serving = to_input(decode(record.path.read_bytes()), PREPROCESS)
        assert serving.shape == (1, 128, 128)
        np.testing.assert_array_equal(tensor, serving)


def test_fit_export_parity_and_keys(trained: tuple[Path, Path], tmp_path: Path) -> None:
    tmp, ckpt = trained
    run = ckpt.parent
    assert (run / CONFIG_FILE).is_file() and (run / CURVE_FILE).is_file()
    assert (
        len((run / LOSSES_FILE).read_text().splitlines()) == 1 + 2
    )  # header + 2 steps

    bundle = export_detection_bundle(ckpt, tmp / "images", tmp_path / "bundle")
    manifest = read_manifest(bundle)
    assert manifest.kind == "detection" and manifest.code_bits == 64
    assert manifest.version.startswith("detect-cvae-")
    assert manifest.preprocess == PREPROCESS
    assert (manifest.thresholds.max_hamming, manifest.thresholds.min_cosine) == (
        12,
        0.9,
    )
    training = manifest.extra["training"]
    assert training["split_seed"] == 20261122 and training["images"] == 16
    parity = manifest.extra["parity"]
    assert parity["images"] >= 8 and parity["max_abs_error"]["embedding"] <= 1e-4
    assert parity["identical"]["first_key"] and parity["identical"]["second_key"]
    assert (bundle / MODEL_FILE).stat().st_size < 36_000_000

    # The shipped graph, run like the encoder runs it: keys follow copyfree.codes.
    theta = np.asarray(manifest.extra["theta"])
    assert theta.shape == (64,)
    session = ort.InferenceSession(
        str(bundle / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    paths = sorted((tmp / "images").iterdir())[:5]
    x = np.stack([to_input(decode(p.read_bytes()), manifest.preprocess) for p in paths])
    emb, k1, k2 = session.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x})
    np.testing.assert_array_equal(k1, first_key(emb, theta))
    np.testing.assert_array_equal(k2, second_key(emb))
    # And the ONNX embedding matches the PyTorch model (fp16-rounded weights).
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = CVAE()
    model.load_state_dict(state["model"])
    model.eval()
    from copyfree_train.onnx_export import round_weights_to_fp16

    round_weights_to_fp16(model)
    with torch.no_grad():
        mu, _ = model.encoder(torch.from_numpy(x))
    np.testing.assert_allclose(emb, mu.numpy(), atol=1e-4, rtol=0)


def test_resume_continues_where_it_stopped(trained: tuple[Path, Path]) -> None:
    tmp, ckpt = trained
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert first["epoch"] == 1 and first["step"] == 2

    again = train_detection(_config(tmp))  # same config, finished: a no-op
    assert torch.load(again, map_location="cpu", weights_only=False)["step"] == 2

    train_detection(_config(tmp, epochs=2))
    resumed = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["step"] == 4
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    assert json.loads((ckpt.parent / CONFIG_FILE).read_text())["epochs"] == 2

    with pytest.raises(ValueError, match="different config"):
        train_detection(_config(tmp, epochs=3, lr=0.5))


def test_fine_tune_starts_from_given_weights(trained: tuple[Path, Path]) -> None:
    tmp, ckpt = trained
    base = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    # lr 0: Adam changes nothing, so the weights must be exactly the base run's.
    tuned = train_detection(
        _config(tmp, out=tmp / "ft", init_from=ckpt, max_steps=1, lr=0.0, lr_min=0.0)
    )
    state = torch.load(tuned, map_location="cpu", weights_only=False)
    assert state["config"]["init_from"] == str(ckpt)
    for name in ("encoder.dense.0.weight", "encoder.mu.weight", "decoder.up.4.bias"):
        assert torch.equal(state["model"][name], base[name]), name


def test_lite0_trains_only_its_late_stages_and_exports_the_same_key_contract(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from copyfree_train.lite_keys import PREPROCESS as LITE_PREPROCESS
    from copyfree_train.lite_keys import TRAIN_FROM_BLOCK, LiteDetector

    tmp, _ = trained
    config = _config(
        tmp, out=tmp_path / "lite", model="lite0", views="suite", contrastive=1.0
    )
    ckpt = train_detection(config)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    pretrained = LiteDetector().state_dict()
    frozen = f"encoder.backbone._blocks.{TRAIN_FROM_BLOCK - 1}."
    trained_block = f"encoder.backbone._blocks.{TRAIN_FROM_BLOCK}."
    for name, value in state.items():
        if name.startswith(
            ("encoder.backbone._conv_stem", "encoder.backbone._bn0")
        ) or (name.startswith(frozen)):
            # weights and BatchNorm statistics of the frozen stages stay ImageNet's
            assert torch.equal(value, pretrained[name]), name
    moved = [
        n
        for n in state
        if n.startswith(trained_block) and n.endswith("weight")
        and not torch.equal(state[n], pretrained[n])
    ]  # fmt: skip
    assert moved, "the late stages must train"

    bundle = export_detection_bundle(ckpt, tmp / "images", tmp_path / "bundle")
    manifest = read_manifest(bundle)
    assert manifest.version.startswith("detect-lite0-")
    assert manifest.preprocess == LITE_PREPROCESS and manifest.preprocess.channels == 3
    assert manifest.extra["architecture"] == "lite0-128-mlp-64"
    parity = manifest.extra["parity"]
    assert parity["identical"]["first_key"]
    # round(1000 x) of components near +-1: torch and ONNX Runtime may land on either
    # side of a .5 now and then (export allows a difference of 1 there and counts it).
    assert parity["rounding_ties"]["second_key"] <= parity["images"]
    session = ort.InferenceSession(
        str(bundle / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    paths = sorted((tmp / "images").iterdir())[:5]
    x = np.stack([to_input(decode(p.read_bytes()), manifest.preprocess) for p in paths])
    emb, k1, k2 = session.run(list(DETECTION_OUTPUTS), {INPUT_NAME: x})
    theta = np.asarray(manifest.extra["theta"])
    np.testing.assert_array_equal(k1, first_key(emb, theta))
    np.testing.assert_array_equal(k2, second_key(emb))
    # L2-normalised times 8: the int16 second key can never saturate.
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 8.0, rtol=1e-3)


def test_batch_order_is_a_permutation_with_look_alike_groups_inside_batches() -> None:
    from copyfree_train.train_detect import batch_order

    groups = [[0, 1, 2], [10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    n, batch = 103, 16
    order = batch_order(n, batch, groups, 0.5, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(n))
    batches = [set(order[i : i + batch].tolist()) for i in range(0, n, batch)]
    for g in groups[:2]:  # small groups are never split across batches
        assert any(set(g) <= b for b in batches), g
    # the big group is split into pieces of at most share * batch = 8
    big = [len(b & set(groups[2])) for b in batches if b & set(groups[2])]
    assert sum(big) == 11 and max(big) <= 8
    again = batch_order(n, batch, groups, 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(order, again)


def test_cli_train_passes_the_model_choice_through(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from copyfree_cli.__main__ import cmd_train

    tmp, _ = trained
    out = tmp_path / "cli"
    argv = ["detect", "--images", str(tmp / "images"), "--out", str(out)]
    argv += ["--model", "lite0", "--epochs", "1", "--max-steps", "1"]
    assert cmd_train([*argv, "--batch-size", "4", "--hard-negatives", "0.5"]) == 0
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert (saved["model"], saved["hard_negatives"]) == ("lite0", 0.5)


def test_lite0_can_unfreeze_the_whole_backbone() -> None:
    from copyfree_train.lite_keys import LiteKeyEncoder

    enc = LiteKeyEncoder(pretrained=False, train_from=0).train()
    frozen = [n for n, p in enc.named_parameters() if not p.requires_grad]
    assert all(n.startswith("backbone._fc.") for n in frozen), (
        frozen
    )  # unused classifier
    assert enc.backbone._bn0.training  # its BatchNorm adapts too
    default = LiteKeyEncoder(pretrained=False).train()
    assert not default.backbone._bn0.training
    assert not any(p.requires_grad for p in default.backbone._conv_stem.parameters())
    with pytest.raises(ValueError, match="block number"):
        LiteKeyEncoder(pretrained=False, train_from=99)
