"""Detection checkpoint -> model bundle (e.g. models/detect-cvae/: model.onnx +
manifest.json).

Owns theta (the mean embedding over the registered training images, computed here
with the float16-rounded weights that ship), the parity check on real images, and the
detection manifest (version, thresholds, training summary, split seed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from copyfree.bundle import DETECTION_OUTPUTS, Manifest, Thresholds
from copyfree.codes import FIRST_KEY_BITS
from copyfree.preprocess import PreprocessSpec, to_input
from copyfree_train.cvae import DetectionKeyHead
from copyfree_train.data import load_rgb
from copyfree_train.onnx_export import (
    check_parity,
    export_onnx,
    round_weights_to_fp16,
    write_bundle,
)
from copyfree_train.train_detect import (
    DETECTORS,
    DetectTrainConfig,
    load_model,
    training_records,
)

log = logging.getLogger(__name__)

PARITY_IMAGES = 16
_BATCH = 64


def embed(
    model: torch.nn.Module, inputs: np.ndarray, threads: int | None = None
) -> np.ndarray:
    """Preprocessed inputs -> (n,64) float32 detection embeddings, in batches."""
    if threads:
        torch.set_num_threads(threads)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), _BATCH):
            mu = model.encoder.embed(torch.from_numpy(inputs[i : i + _BATCH]))
            out.append(mu.numpy())
    return np.concatenate(out) if out else np.zeros((0, 64), np.float32)


def weights_hash(model: torch.nn.Module) -> str:
    """Short content hash of the (rounded) weights: the bundle version's suffix."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def export_detection_bundle(
    checkpoint: Path,
    images_dir: Path | None,
    out_dir: Path,
    version: str | None = None,
    limit: int = 5000,
) -> Path:
    """Export checkpoint to out_dir and return it.

    images_dir: the folder the model was trained on (None: the one in the checkpoint's
    config). Theta is the mean mu over its *training* part (the same split as the
    trainer, so held-out images never shape theta), up to `limit` images.
    """
    checkpoint = Path(checkpoint)
    model, summary = load_model(checkpoint)
    config = DetectTrainConfig.from_dict(summary["config"])
    if images_dir is not None:
        config = DetectTrainConfig.from_dict(
            {**config.to_dict(), "images": str(images_dir)}
        )
    detector = DETECTORS[config.model]
    spec = detector.preprocess
    train, held = training_records(config)
    train = train[:limit]

    model.encoder.fuse_for_export()  # so the fp16 rounding applies to what ONNX holds
    round_weights_to_fp16(model)  # theta and parity computed with the weights that ship
    inputs = np.stack([_input(r.path, spec) for r in train])
    mu = embed(model, inputs)
    theta = mu.mean(axis=0).astype(np.float32)
    log.info("theta from %d training images", len(train))

    head = DetectionKeyHead(model.encoder, theta)
    head.eval()
    example = torch.from_numpy(inputs[:2])
    onnx_model = export_onnx(head, example, DETECTION_OUTPUTS)
    # Parity on real images: held-out ones (never trained on) first, then training ones.
    held_inputs = [_input(r.path, spec) for r in held[: PARITY_IMAGES // 2]]
    parity_inputs = inputs[:PARITY_IMAGES]
    if held_inputs:
        parity_inputs = np.concatenate(
            [np.stack(held_inputs), inputs[: PARITY_IMAGES - len(held_inputs)]]
        )
    parity = check_parity(
        head, onnx_model, parity_inputs, DETECTION_OUTPUTS, rounded={"second_key": 1}
    )

    bits = mu > theta
    date = dt.date.today().strftime("%Y%m%d")
    manifest = Manifest(
        name=detector.bundle_name,
        version=version or f"{detector.bundle_name}-{date}-{weights_hash(head)}",
        kind="detection",
        preprocess=spec,
        code_bits=FIRST_KEY_BITS,
        thresholds=Thresholds(),
        extra={
            # float32 values written as exact decimals, so a reader comparing a float32
            # embedding with them gets the same bits as the graph.
            "theta": [float(v) for v in theta],
            "architecture": detector.architecture,
            "training": {
                "images": summary["images"],
                "held_out": summary["held_out"],
                "split_seed": config.split_seed,
                "holdout_fraction": config.holdout,
                "epochs": summary["epochs"],
                "steps": summary["steps"],
                "seconds": summary["seconds"],
                "final_losses": summary["final_losses"],
                "config": summary["config"],
                **_base_run(config),
            },
            "theta_images": len(train),
            # Share of 1s per bit over the training images: near 0.5 means a useful bit.
            "bit_balance": [round(float(v), 4) for v in bits.mean(axis=0)],
        },
    )
    write_bundle(Path(out_dir), onnx_model, manifest, parity)
    log.info("bundle %s written to %s", manifest.version, out_dir)
    return Path(out_dir)


def _base_run(config: DetectTrainConfig) -> dict[str, object]:
    """Provenance of the run a fine-tune started from (its weights are in this one)."""
    if config.init_from is None or not Path(config.init_from).is_file():
        return {}
    base = torch.load(config.init_from, map_location="cpu", weights_only=False)
    s = base["summary"]
    keys = ("images", "epochs", "steps", "seconds", "final_losses", "config")
    return {"initialised_from": {k: s[k] for k in keys}}


def _input(path: Path, spec: PreprocessSpec) -> np.ndarray:
    return to_input(load_rgb(path), spec)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        description="Export a detection checkpoint as a bundle."
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="training image folder (default: the one in the checkpoint)",
    )
    p.add_argument("--version", default=None)
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    export_detection_bundle(
        args.checkpoint, args.images, args.out, args.version, args.limit
    )


if __name__ == "__main__":
    main()
