"""Any folder of images as a list of records: ids, labels and metadata from a
manifest.csv (columns file or id, label, and any others) or from sub-folder names."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    item_id: str
    label: str  # "" when the folder carries no labels
    info: dict[str, str] = field(default_factory=dict, compare=False)  # manifest row


def scan_folder(root: Path, *, limit: int | None = None) -> list[ImageRecord]:
    """All images under root, sorted by id. Labels from root/manifest.csv if present,
    else from the first sub-folder under root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    manifest = root / "manifest.csv"
    records: list[ImageRecord]
    if manifest.is_file():
        records = _from_manifest(root, manifest)
    else:
        records = []
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                rel = path.relative_to(root)
                label = rel.parts[0] if len(rel.parts) > 1 else ""
                records.append(ImageRecord(path, rel.with_suffix("").as_posix(), label))
    records.sort(key=lambda r: r.item_id)
    if not records:
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}"
        )
    return records[:limit] if limit is not None else records


def _from_manifest(root: Path, manifest: Path) -> list[ImageRecord]:
    out = []
    with manifest.open(newline="") as f:
        for row in csv.DictReader(f):
            file = row.get("file") or f"{row['id']}.jpg"
            item_id = row.get("id") or Path(file).stem
            path = root / file
            if path.is_file():
                out.append(ImageRecord(path, item_id, row.get("label", ""), dict(row)))
    return out
