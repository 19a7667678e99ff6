"""Image folders as datasets: any folder of images, labels from manifest.csv (columns
`file`/`id`/`label`, as in the dev corpus) or from sub-folder names."""

from __future__ import annotations

import csv
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from copyfree.folders import IMAGE_SUFFIXES, ImageRecord, scan_folder
from copyfree.preprocess import PreprocessSpec, decode, to_input

# Re-exported: training code reads folders through this module.
__all__ = ["IMAGE_SUFFIXES", "ImageRecord", "scan_folder"]


def load_rgb(path: Path) -> Image.Image:
    """Decode a file with the serving decoder (same limits, EXIF, alpha handling)."""
    return decode(Path(path).read_bytes())


def split_records(
    records: Sequence[ImageRecord], fractions: Sequence[float], seed: int
) -> list[list[ImageRecord]]:
    """Deterministic random split into len(fractions) parts (last takes the rest)."""
    order = np.random.default_rng(seed).permutation(len(records))
    parts, start = [], 0
    for i, frac in enumerate(fractions):
        end = (
            len(records)
            if i == len(fractions) - 1
            else start + round(frac * len(records))
        )
        parts.append([records[j] for j in sorted(order[start:end])])
        start = end
    return parts


class ImageCache:
    """Decoded images kept in memory, downscaled once to `keep_size` on the longer side
    so augmentation of thousands of images does not re-decode JPEGs every epoch."""

    def __init__(self, records: Sequence[ImageRecord], keep_size: int = 256) -> None:
        self.records = list(records)
        self._images: list[Image.Image] = []
        for r in self.records:
            im = load_rgb(r.path)
            im.thumbnail((keep_size, keep_size), Image.Resampling.BILINEAR)
            self._images.append(im)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> Image.Image:
        return self._images[i]


def make_inputs(
    images: Sequence[Image.Image],
    spec: PreprocessSpec,
    augment: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """Images -> (n, c, s, s) float32 through copyfree.preprocess (optionally augmented
    first, PIL -> PIL, so serving and training share the exact tensor conversion)."""
    return np.stack([to_input(augment(im) if augment else im, spec) for im in images])


def read_siblings(
    folder: Path, kinds: Collection[str] | None = None
) -> list[tuple[str, str]]:
    """Look-alike pairs (a, b) of the folder's near_duplicates.csv (columns a, b and
    optionally kind), only those of `kinds` when given; none without the file."""
    path = Path(folder) / "near_duplicates.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            (r["a"], r["b"])
            for r in csv.DictReader(f)
            if kinds is None or r.get("kind") in kinds
        ]


def sibling_groups(
    records: Sequence[ImageRecord], pairs: Sequence[tuple[str, str]]
) -> list[list[int]]:
    """Every record's group (positions into `records`): the connected components of
    the pairs whose both ids are among the records; a record without pairs is alone."""
    index = {r.item_id: i for i, r in enumerate(records)}
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        if a in index and b in index:
            parent[root(index[a])] = root(index[b])
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())
