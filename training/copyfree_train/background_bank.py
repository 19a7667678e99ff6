"""`copyfree background`: build a detection bundle's background bank
(copyfree.background) from a folder of ordinary, unregistered images.

The bank is the bundle's own second keys of those images, computed exactly as the
encoder computes a query's (decode, the bundle's preprocessing, its ONNX model). When
the bundle was trained here and --images is its training folder, the images the
training run held out are left out, so the held-out evaluation (`copyfree eval detect`)
never meets its own registered works or distractors in the bank.

    copyfree background --bundle models/detect-cvae --images ../shared/datasets/dev
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from copyfree.background import DEFAULT_TOP_K, write_bank
from copyfree.bundle import INPUT_NAME, MODEL_FILE, read_manifest
from copyfree.folders import scan_folder
from copyfree.preprocess import decode, to_input

log = logging.getLogger(__name__)
BATCH = 64


def bank_images(bundle: Path, images: Path) -> tuple[list[Path], int]:
    """(images for the bank, how many held-out images were left out)."""
    paths = [r.path for r in scan_folder(images)]
    training = read_manifest(bundle).extra.get("training", {})
    if "config" not in training:
        return paths, 0
    from copyfree_train.eval_detect import DetectEvalConfig, held_out_records

    try:
        held = {
            r.path.resolve()
            for r in held_out_records(DetectEvalConfig(images=images, bundle=bundle))
        }
    except SystemExit:  # the run held out nothing
        return paths, 0
    kept = [p for p in paths if p.resolve() not in held]
    return kept, len(paths) - len(kept)


def second_keys(
    bundle: Path, paths: list[Path], threads: int = 0, progress: bool = True
) -> np.ndarray:
    """(n, 64) int16 second keys of the images, as the encoder computes them;
    undecodable files are skipped with a warning."""
    manifest = read_manifest(bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(bundle / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
    )
    out: list[np.ndarray] = []
    for start in tqdm(
        range(0, len(paths), BATCH), desc="background keys", disable=not progress
    ):
        batch = []
        for p in paths[start : start + BATCH]:
            try:
                batch.append(to_input(decode(p.read_bytes()), manifest.preprocess))
            except Exception as e:  # a bad file must not end a long build
                log.warning("skipped %s: %s", p, e)
        if batch:
            (keys,) = session.run(["second_key"], {INPUT_NAME: np.stack(batch)})
            out.append(keys)
    return np.concatenate(out) if out else np.zeros((0, 64), np.int16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="copyfree background",
        description="Build a detection bundle's background bank from a folder of "
        "ordinary, unregistered images (its held-out images are left out).",
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    if read_manifest(args.bundle).kind != "detection":
        raise SystemExit(f"{args.bundle} is not a detection bundle")
    paths, left_out = bank_images(args.bundle, args.images)
    if len(paths) < args.top_k:
        raise SystemExit(
            f"{args.images}: {len(paths)} usable images, need at least --top-k "
            f"{args.top_k}"
        )
    keys = second_keys(args.bundle, paths, args.threads, not args.no_progress)
    write_bank(
        args.bundle,
        keys,
        args.top_k,
        {"source": str(args.images), "held_out_left_out": left_out},
    )
    log.info(
        "background bank of %d images (%d held-out images left out) written to %s",
        len(keys),
        left_out,
        args.bundle,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
