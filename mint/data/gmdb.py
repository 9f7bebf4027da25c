"""A user's rare-disease folder in a GestaltMatcher-Database-like layout.

The GMDB itself is access-controlled; this loader reads a local export arranged as

    ROOT/
      metadata.csv          one row per photo, UTF-8, with a header row
      images/
        <image_id>.jpg      (or .jpeg / .png; any size, RGB or not: converted to RGB)

metadata.csv columns (extra columns are ignored):

    image_id       unique id; names the photo file (without extension) and the Sample
    disease        the syndrome name; the label set is the sorted set of these names
    clinical_text  the note the student will read (may be empty)
    age            age in years (may be empty)
    sex            free text such as "female" / "male" (may be empty)
    split          optional: train / val / test. Without this column the split is
                   stratified by disease with `split_fractions` and `seed`.

Photos are decoded with PIL, converted to RGB and resized (bilinear) to image_size x
image_size uint8 arrays in `Sample.image`: a timm backbone in the teacher consumes them.
GMDB photos are face crops, so the resize does not preserve aspect ratio.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mint.data.task_data import SPLITS, Sample, TaskData, stratified_split
from mint.files import decode_utf8

REQUIRED_COLUMNS = ("image_id", "disease", "clinical_text", "age", "sex")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = (
    "expected layout: ROOT/metadata.csv with columns image_id,disease,clinical_text,age,sex[,split] "
    "and ROOT/images/<image_id>.jpg|.jpeg|.png (see mint/data/gmdb.py)"
)


class GMDBFormatError(ValueError):
    """The folder does not follow the documented layout; the message names the path."""


def _read_rows(csv_path: Path) -> tuple[list[dict[str, str]], bool]:
    try:
        text = decode_utf8(csv_path, csv_path.read_bytes())  # names the line of a byte that is not UTF-8
    except ValueError as err:
        raise GMDBFormatError(f"{err}. {LAYOUT}") from None
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise GMDBFormatError(f"{csv_path}: missing column(s) {missing}; found {columns}. {LAYOUT}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not rows:
        raise GMDBFormatError(f"{csv_path}: no rows. {LAYOUT}")
    return rows, "split" in columns


def _find_image(images_dir: Path, image_id: str, csv_path: Path, line: int) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    raise GMDBFormatError(
        f"{csv_path} line {line}: no image for image_id {image_id!r} "
        f"(looked for {images_dir / image_id}{{{','.join(IMAGE_SUFFIXES)}}}). {LAYOUT}"
    )


def _decode(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as err:
        raise GMDBFormatError(f"{path}: not a decodable image ({err}). {LAYOUT}") from err
    return np.asarray(rgb, dtype=np.uint8)


def _age(value: str, csv_path: Path, line: int) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError as err:
        raise GMDBFormatError(
            f"{csv_path} line {line}: age {value!r} is not a number of years. {LAYOUT}"
        ) from err


def load_gmdb(
    root: str | Path,
    *,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    image_size: int = 224,
) -> TaskData:
    """The folder as a "rare_disease" TaskData (layout in the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise GMDBFormatError(f"{root}: no such folder. {LAYOUT}")
    csv_path = root / "metadata.csv"
    if not csv_path.is_file():
        raise GMDBFormatError(f"{csv_path}: not found. {LAYOUT}")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise GMDBFormatError(f"{images_dir}: no such folder. {LAYOUT}")
    rows, has_split = _read_rows(csv_path)

    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if not row["image_id"]:
            raise GMDBFormatError(f"{csv_path} line {line}: empty image_id. {LAYOUT}")
        if row["image_id"] in seen:
            raise GMDBFormatError(
                f"{csv_path} line {line}: image_id {row['image_id']!r} appears twice. {LAYOUT}"
            )
        seen.add(row["image_id"])
        if not row["disease"]:
            raise GMDBFormatError(
                f"{csv_path} line {line}: empty disease for image_id {row['image_id']!r}. {LAYOUT}"
            )
        if has_split and row["split"] not in SPLITS:
            raise GMDBFormatError(
                f"{csv_path} line {line}: split {row['split']!r} is not one of {list(SPLITS)}. {LAYOUT}"
            )

    labels = sorted({row["disease"] for row in rows})
    index = {name: i for i, name in enumerate(labels)}
    samples = []
    for line, row in enumerate(rows, start=2):
        image_path = _find_image(images_dir, row["image_id"], csv_path, line)
        samples.append(
            Sample(
                id=row["image_id"],
                label=index[row["disease"]],
                text=row["clinical_text"],
                image=_decode(image_path, image_size),
                meta={
                    "age_years": _age(row["age"], csv_path, line),
                    "sex": row["sex"] or None,
                    "image_path": str(image_path.relative_to(root)),
                },
            )
        )
    if has_split:
        split_index = {split: [i for i, row in enumerate(rows) if row["split"] == split] for split in SPLITS}
    else:
        split_index = stratified_split([s.label for s in samples], split_fractions, seed)
    return TaskData(
        name="rare_disease",
        labels=labels,
        splits={split: [samples[i] for i in idx] for split, idx in split_index.items()},
    )
