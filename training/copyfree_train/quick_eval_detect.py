"""Quick robustness check of a detection bundle on its held-out images.

Runs the bundle the way the encoder does (ONNX Runtime, copyfree.preprocess), on the
images the trainer held out (the split recorded in the manifest), and reports for two
edits -- JPEG re-encode at quality 50, and a centre crop keeping 90% of each side --
the Hamming distance between the first keys of original and copy (mean, share <= T1),
the mean cosine of the second keys, 1:N top-1 by Hamming (ties by cosine) and the
share of copies that the Detect rule (T1, T2, K from the manifest) attributes to their
original, among all held-out originals registered; plus the Hamming distance between
different images (mean, share <= T1) and the Detect rule's false-match rate for
never-registered images (each original against all the others).
The full attack suite and report: `copyfree eval detect` (copyfree_train.eval_detect);
this is the trainer's check.

    python -m copyfree_train.quick_eval_detect models/detect-cvae [--images DIR]
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from copyfree.bundle import DETECTION_OUTPUTS, INPUT_NAME, MODEL_FILE, read_manifest
from copyfree.codes import cosine, unpack_bits
from copyfree.preprocess import PreprocessSpec, decode, to_input
from copyfree_train.attacks import crop
from copyfree_train.train_detect import DetectTrainConfig, training_records


def jpeg_q50(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=50)
    return decode(buf.getvalue())


def centre_crop_90(image: Image.Image) -> Image.Image:
    return crop(image, 0.9)


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg_q50": jpeg_q50,
    "center_crop_90": centre_crop_90,
}


def run_bundle(
    session: ort.InferenceSession, spec: PreprocessSpec, images: list[Image.Image]
) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {name: [] for name in DETECTION_OUTPUTS}
    for i in range(0, len(images), 64):
        batch = np.stack([to_input(im, spec) for im in images[i : i + 64]])
        for name, value in zip(
            DETECTION_OUTPUTS,
            session.run(list(DETECTION_OUTPUTS), {INPUT_NAME: batch}),
            strict=True,
        ):
            outs[name].append(value)
    return {name: np.concatenate(v) for name, v in outs.items()}


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,8) x (m,8) packed keys -> (n,m) Hamming distances."""
    ab, bb = unpack_bits(a, 64).astype(np.int32), unpack_bits(b, 64).astype(np.int32)
    return ab.shape[1] - (ab @ bb.T + (1 - ab) @ (1 - bb).T)


def nearest(
    hamming_row: np.ndarray, registered_k2: np.ndarray, query_k2: np.ndarray
) -> int:
    """1:N: the registered item nearest by Hamming, ties broken by second-key cosine."""
    cands = np.flatnonzero(hamming_row == hamming_row.min())
    return int(cands[np.argmax(cosine(registered_k2[cands], query_k2))])


def detect(
    hamming_row: np.ndarray, cosine_row: np.ndarray, t1: int, t2: float, k: int
) -> int | None:
    """DESIGN.md §3 Detect over one registry: the matched index, or None."""
    cands = np.flatnonzero(hamming_row <= t1)
    if len(cands) == 1:
        return int(cands[0])  # paper rule: a single stage-1 candidate is the answer
    if len(cands) == 0:
        if k == 0:
            return None
        cands = np.argsort(hamming_row, kind="stable")[:k]
    best = cands[np.argmax(cosine_row[cands])]
    return int(best) if cosine_row[best] >= t2 else None


def _cosines(query_k2: np.ndarray, registered_k2: np.ndarray) -> np.ndarray:
    """(n,64) x (m,64) int16 -> (n,m) cosine."""
    q = query_k2.astype(np.float64)
    r = registered_k2.astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    r /= np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return q @ r.T


def evaluate(
    bundle: Path, images_dir: Path | None = None, limit: int | None = None
) -> dict[str, Any]:
    manifest = read_manifest(bundle)
    t1 = manifest.thresholds.max_hamming
    training = manifest.extra["training"]
    config = DetectTrainConfig.from_dict(training["config"])
    if images_dir is not None:
        config = DetectTrainConfig.from_dict(
            {**config.to_dict(), "images": str(images_dir)}
        )
    _, held = training_records(config)
    held = held[:limit] if limit else held
    if not held:
        raise SystemExit("the bundle's training run held out no images")
    session = ort.InferenceSession(
        str(Path(bundle) / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    originals = [decode(r.path.read_bytes()) for r in held]
    base = run_bundle(session, manifest.preprocess, originals)

    n = len(held)
    th = manifest.thresholds
    self_dist = hamming_matrix(base["first_key"], base["first_key"])
    diff = self_dist[np.triu_indices(n, 1)]
    # Never-registered queries: each original against a registry of all the others.
    # (An upper bound: the held-out part keeps some real near-duplicate pairs.)
    loo_dist = self_dist.astype(np.float64)
    np.fill_diagonal(loo_dist, np.inf)
    loo_cos = _cosines(base["second_key"], base["second_key"])
    np.fill_diagonal(loo_cos, -2.0)
    false_matches = [
        detect(loo_dist[i], loo_cos[i], th.max_hamming, th.min_cosine, th.fallback_k)
        is not None
        for i in range(n)
    ]
    result: dict[str, Any] = {
        "bundle": manifest.version,
        "held_out_images": n,
        "split_seed": training.get("split_seed"),
        "t1": t1,
        "different_images": {
            "pairs": int(diff.size),
            "hamming_mean": float(diff.mean()),
            "share_le_t1": float(np.mean(diff <= t1)),
        },
        "never_registered_false_match_rate": float(np.mean(false_matches)),
        "thresholds": th.to_dict(),
    }
    for name, edit in EDITS.items():
        keys = run_bundle(session, manifest.preprocess, [edit(im) for im in originals])
        dist = hamming_matrix(keys["first_key"], base["first_key"])
        same = np.diag(dist)
        cos = np.array(
            [
                cosine(keys["second_key"][i : i + 1], base["second_key"][i])[0]
                for i in range(n)
            ]
        )
        best = [
            nearest(row, base["second_key"], keys["second_key"][i])
            for i, row in enumerate(dist)
        ]
        all_cos = _cosines(keys["second_key"], base["second_key"])
        verdicts = [
            detect(dist[i], all_cos[i], th.max_hamming, th.min_cosine, th.fallback_k)
            for i in range(n)
        ]
        result[name] = {
            "hamming_mean": float(same.mean()),
            "share_le_t1": float(np.mean(same <= t1)),
            "second_key_cosine_mean": float(cos.mean()),
            "top1_nearest_hamming": float(np.mean(np.array(best) == np.arange(n))),
            "detect_correct": float(np.mean([v == i for i, v in enumerate(verdicts)])),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="image folder (default: the one the bundle was trained on)",
    )
    p.add_argument("--limit", type=int, default=None, help="max held-out images")
    p.add_argument(
        "--json", type=Path, default=None, help="also write the numbers here"
    )
    args = p.parse_args(argv)
    result = evaluate(args.bundle, args.images, args.limit)
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 (a script's output)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
