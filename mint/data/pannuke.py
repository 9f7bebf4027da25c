"""PanNuke (Gamper et al. 2019/2020) from its released fold arrays at a user path.

Two layouts are accepted under `root`, per fold n:
- the release layout: `Fold {n}/images/fold{n}/images.npy` and `.../types.npy`, with optional
  `Fold {n}/masks/fold{n}/masks.npy`;
- a flat layout: `fold{n}/images.npy`, `fold{n}/types.npy`, optional `fold{n}/masks.npy`.
`images.npy` is N x H x W x 3 (uint8, or float on the 0-255 scale as released; a float image
whose maximum is <= 1 is taken as 0-1), `types.npy` holds N tissue names, `masks.npy` is
N x H x W x 6: channels neoplastic, inflammatory, connective/soft tissue, dead, epithelial
hold instance ids (0 = none), the sixth is background. Arrays are memory-mapped, so a fold is
read one image at a time. With masks, a sample's description and `meta["counts"]` come from
the number of instances per class; without, the description comes from stain statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mint.data.task_data import SPLITS, Sample, TaskData
from mint.data.tissue import NUCLEUS_CLASSES, TISSUES
from mint.names import normalize_name
from mint.stains import optical_density, stain_concentrations

LAYOUTS = (
    "'<root>/Fold {n}/images/fold{n}/images.npy' + 'types.npy' (optional '<root>/Fold {n}/masks/fold{n}/masks.npy'), "
    "or '<root>/fold{n}/images.npy' + 'types.npy' (optional 'masks.npy')"
)


def _key(name: str) -> str:
    """Spelling-insensitive key: 'Adrenal_gland', 'adrenal glands' and 'Adrenal Glands' agree;
    so do 'HeadNeck', 'head_and_neck' and 'Head & Neck' (spaces, "and" and a plural "s" dropped)."""
    return "".join(w for w in normalize_name(name).split() if w != "and").rstrip("s")


_TISSUE_BY_KEY = {_key(name): name for name in TISSUES}


def normalize_tissue(name: str) -> str:
    """The paper's spelling (`TISSUES`) of a PanNuke tissue name ('HeadNeck' -> 'Head & Neck'); KeyError if unknown."""
    try:
        return _TISSUE_BY_KEY[_key(name)]
    except KeyError:
        raise KeyError(f"unknown tissue name {name!r}; known: {TISSUES}") from None


def load_pannuke(
    root: str | Path,
    *,
    folds_to_splits: dict[str, list[int]] | None = None,
    image_size: int | None = None,
) -> TaskData:
    """PanNuke folds as a `TaskData` named "tissue"; folds map to splits (default 1/2/3 -> train/val/test).

    `image_size` resizes every image (bilinear) to a square of that side; None keeps 256.
    """
    folds_to_splits = folds_to_splits or {"train": [1], "val": [2], "test": [3]}
    root = Path(root).expanduser()
    if set(folds_to_splits) != set(SPLITS):
        raise ValueError(
            f"folds_to_splits must map each of {SPLITS} to a list of folds, got {folds_to_splits}"
        )
    used = [f for folds in folds_to_splits.values() for f in folds]
    if len(used) != len(set(used)):
        raise ValueError(f"folds_to_splits uses a fold in more than one split: {folds_to_splits}")
    if not root.is_dir():
        raise FileNotFoundError(f"PanNuke root {root} is not a directory; expected per fold {LAYOUTS}")
    splits = {
        split: [s for fold in folds for s in _load_fold(root, fold, image_size)]
        for split, folds in folds_to_splits.items()
    }
    return TaskData(name="tissue", labels=list(TISSUES), splits=splits)


def _fold_files(root: Path, fold: int) -> tuple[Path, Path, Path | None]:
    release = root / f"Fold {fold}"
    candidates = [
        (release / "images" / f"fold{fold}", release / "masks" / f"fold{fold}"),
        (root / f"fold{fold}", root / f"fold{fold}"),
    ]
    for image_dir, mask_dir in candidates:
        images, types = image_dir / "images.npy", image_dir / "types.npy"
        if images.is_file() and types.is_file():
            masks = mask_dir / "masks.npy"
            return images, types, masks if masks.is_file() else None
    raise FileNotFoundError(
        f"PanNuke fold {fold}: no images.npy + types.npy under {root}; expected {LAYOUTS}"
    )


def _load_fold(root: Path, fold: int, image_size: int | None) -> list[Sample]:
    images_path, types_path, masks_path = _fold_files(root, fold)
    try:
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # truncated, not .npy, or an object array
        raise ValueError(f"{images_path}: not a readable N x H x W x 3 .npy image array: {err}") from None
    try:
        types = np.load(types_path, allow_pickle=False)
    except ValueError as err:  # an object array: refuse to unpickle, say how to re-save it
        raise ValueError(
            f"{types_path}: expected an array of strings (np.save(path, np.array(names))): {err}"
        ) from None
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{images_path}: expected N x H x W x 3 images, got shape {images.shape}")
    if types.ndim != 1 or len(types) != len(images):
        raise ValueError(
            f"{types_path}: expected {len(images)} tissue names (one per image in {images_path.name}), "
            f"got shape {types.shape}"
        )
    masks = None
    if masks_path is not None:
        masks = np.load(masks_path, mmap_mode="r")
        expected = (*images.shape[:3], 6)
        if masks.shape != expected:
            raise ValueError(
                f"{masks_path}: expected shape {expected} (5 nucleus classes + background), got {masks.shape}"
            )
    try:
        labels = [TISSUES.index(normalize_tissue(str(t))) for t in types]
    except KeyError as err:
        raise ValueError(f"{types_path}: {err.args[0]}") from None

    samples = []
    for i, label in enumerate(labels):
        image = _to_uint8(np.asarray(images[i]))
        meta = {"fold": fold, "index": i, "source": str(images_path)}
        if masks is not None:
            counts = {
                name: int(np.count_nonzero(np.unique(np.asarray(masks[i, ..., c]))))
                for c, name in enumerate(NUCLEUS_CLASSES)
            }
            meta["counts"] = counts
            text = describe_counts(counts)
        else:
            text = describe_stain(image)
        if image_size is not None and image.shape[:2] != (image_size, image_size):
            image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
        samples.append(
            Sample(id=f"pannuke-fold{fold}-{i:05d}", label=label, text=text, image=image, meta=meta)
        )
    return samples


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    if image.max() <= 1.0:
        image = image * 255.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def describe_counts(counts: dict[str, int]) -> str:
    """A description from nucleus counts per class (no tissue name)."""
    total = sum(counts.values())
    if total == 0:
        return "No nuclei are annotated in this patch."
    density = "Few" if total < 15 else "A moderate number of" if total < 50 else "Many"
    parts = [f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n > 0]
    return f"{density} nuclei ({total}): " + ", ".join(parts) + "."


def describe_stain(image: np.ndarray) -> str:
    """A generic description from haematoxylin/eosin densities when no masks are given."""
    concentrations = stain_concentrations(optical_density(image).reshape(-1, 3))
    nuclear = float((concentrations[:, 0] > 0.6).mean())
    eosin = float(np.median(concentrations[:, 1]))
    cellular = (
        "densely cellular"
        if nuclear > 0.3
        else "moderately cellular"
        if nuclear > 0.1
        else "sparsely cellular"
    )
    background = "strongly eosinophilic" if eosin > 0.3 else "pale"
    return f"A {cellular} patch with a {background} background."
