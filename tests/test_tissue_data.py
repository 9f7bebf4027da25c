"""Simulated nuclei (determinism, splits, labels, descriptions, learnability) and the PanNuke loader."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from mint.data.pannuke import load_pannuke, normalize_tissue
from mint.data.tissue import TISSUES, simulate_tissue

PAPER_TISSUES = (
    "Adrenal Glands, Bile Duct, Bladder, Breast, Cervix, Colon, Esophagus, Head & Neck, Kidney, Liver, "
    "Lung, Ovarian, Pancreatic, Prostate, Skin, Stomach, Testis, Thyroid, Uterus"
).split(", ")


@pytest.fixture(scope="module")
def small() -> object:
    return simulate_tissue(n_per_tissue=10, image_size=32, seed=3)


def test_labels_are_the_19_pannuke_tissues_in_paper_order(small) -> None:
    assert small.name == "tissue"
    assert small.labels == PAPER_TISSUES == TISSUES


def test_simulation_is_deterministic_per_seed(small) -> None:
    again = simulate_tissue(n_per_tissue=10, image_size=32, seed=3)
    assert again.fingerprint() == small.fingerprint()
    other = simulate_tissue(n_per_tissue=10, image_size=32, seed=4)
    assert other.fingerprint() != small.fingerprint()


def test_splits_are_stratified_and_images_well_formed(small) -> None:
    for split, expected in (("train", 6), ("val", 2), ("test", 2)):
        assert set(small.label_counts(split).values()) == {expected}
    for s in (s for part in small.splits.values() for s in part):
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert 0 < s.image.min() < s.image.max() <= 255  # H&E never saturates to black
        assert set(s.meta["counts"]) == {"neoplastic", "inflammatory", "connective", "dead", "epithelial"}
        assert sum(s.meta["counts"].values()) == s.meta["generator"]["n_nuclei"] >= 1


def test_descriptions_vary_and_never_name_a_tissue(small) -> None:
    texts = [s.text for part in small.splits.values() for s in part]
    assert len(set(texts)) > 0.9 * len(texts)
    # Every word of every tissue name, and common stems of them.
    forbidden = {w for name in TISSUES for w in re.findall(r"[a-z]+", name.lower())} - {"and"}
    forbidden |= {
        "adrenal",
        "gland",
        "hepat",
        "renal",
        "thyro",
        "ovar",
        "pancrea",
        "uter",
        "esophag",
        "pulmon",
    }
    for text in texts:
        low = text.lower()
        assert not [w for w in forbidden if w in low], text


def test_difficulty_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="mix_concentration"):
        simulate_tissue(n_per_tissue=2, mix_concentration=0)


def test_images_are_learnable_above_chance() -> None:
    path = Path(__file__).resolve().parents[1] / "experiments" / "tissue_data.py"
    spec = importlib.util.spec_from_file_location("tissue_calibration", path)
    calibration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibration)
    data = simulate_tissue(n_per_tissue=15, seed=1, split_fractions=(0.6, 0.0, 0.4))
    results = calibration.probe(data, steps=300)
    assert results["image/top1"] > 3 * (1 / 19)  # chance is 0.053
    assert results["image/top5"] > results["image/top1"]
    assert results["text/top1"] > 2 * (1 / 19)


# --------------------------------------------------------------------------- PanNuke


def _write_fold(root: Path, fold: int, names: list[str], *, release: bool = True, masks: bool = True) -> None:
    rng = np.random.default_rng(fold)
    n = len(names)
    if release:
        image_dir, mask_dir = (
            root / f"Fold {fold}" / "images" / f"fold{fold}",
            root / f"Fold {fold}" / "masks" / f"fold{fold}",
        )
    else:
        image_dir = mask_dir = root / f"fold{fold}"
    image_dir.mkdir(parents=True, exist_ok=True)
    np.save(image_dir / "images.npy", rng.uniform(0, 255, (n, 16, 16, 3)))  # float 0-255, as released
    np.save(image_dir / "types.npy", np.array(names))
    if masks:
        mask_dir.mkdir(parents=True, exist_ok=True)
        m = np.zeros((n, 16, 16, 6))
        m[:, :4, :4, 0] = 1  # one neoplastic nucleus
        m[:, 8:10, 8:10, 1] = 2  # two inflammatory nuclei
        m[:, 12:14, 12:14, 1] = 3
        np.save(mask_dir / "masks.npy", m)


def test_pannuke_release_layout_with_masks(tmp_path: Path) -> None:
    _write_fold(tmp_path, 1, ["Breast", "HeadNeck", "Adrenal_gland"])
    _write_fold(tmp_path, 2, ["Bile-duct", "Colon"])
    _write_fold(tmp_path, 3, ["Kidney"])
    data = load_pannuke(tmp_path, image_size=8)
    assert data.labels == PAPER_TISSUES
    train = data.splits["train"]
    assert [data.labels[s.label] for s in train] == ["Breast", "Head & Neck", "Adrenal Glands"]
    assert [data.labels[s.label] for s in data.splits["val"]] == ["Bile Duct", "Colon"]
    assert train[0].image.shape == (8, 8, 3) and train[0].image.dtype == np.uint8
    assert train[0].meta["counts"] == {
        "neoplastic": 1,
        "inflammatory": 2,
        "connective": 0,
        "dead": 0,
        "epithelial": 0,
    }
    assert "2 inflammatory" in train[0].text and train[0].meta["fold"] == 1


def test_pannuke_flat_layout_without_masks_and_custom_folds(tmp_path: Path) -> None:
    for fold in (1, 2, 3):
        _write_fold(tmp_path, fold, ["Skin", "Lung"], release=False, masks=False)
    data = load_pannuke(tmp_path, folds_to_splits={"train": [1, 2], "val": [], "test": [3]})
    assert len(data.splits["train"]) == 4 and not data.splits["val"]
    assert data.splits["test"][0].image.shape == (16, 16, 3)
    assert "background" in data.splits["test"][0].text and "counts" not in data.splits["test"][0].meta


def test_tissue_spellings_normalise() -> None:
    assert normalize_tissue("HeadNeck") == normalize_tissue("head_and_neck") == "Head & Neck"
    assert normalize_tissue("Adrenal_gland") == "Adrenal Glands"
    assert normalize_tissue("Bile-duct") == "Bile Duct"
    assert all(normalize_tissue(name) == name for name in TISSUES)


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda root: None, "no images.npy"),  # fold 3 missing
        (
            lambda root: np.save(root / "Fold 3/images/fold3/images.npy", np.zeros((2, 16, 16))),
            "N x H x W x 3",
        ),
        (
            lambda root: np.save(root / "Fold 3/images/fold3/types.npy", np.array(["Skin"])),
            "expected 2 tissue names",
        ),
        (
            lambda root: np.save(root / "Fold 3/images/fold3/types.npy", np.array(["Skin", "Brain"])),
            "unknown tissue name 'Brain'",
        ),
        (
            lambda root: np.save(root / "Fold 3/masks/fold3/masks.npy", np.zeros((2, 16, 16, 5))),
            "5 nucleus classes",
        ),
        (  # images that do not decode: a file cut short
            lambda root: (root / "Fold 3/images/fold3/images.npy").write_bytes(b"\x93NUMPY\x01\x00garbage"),
            "not a readable",
        ),
    ],
)
def test_pannuke_errors_name_the_path_and_layout(tmp_path: Path, break_it, match: str) -> None:
    _write_fold(tmp_path, 1, ["Skin", "Lung"])
    _write_fold(tmp_path, 2, ["Skin", "Lung"])
    if match != "no images.npy":
        _write_fold(tmp_path, 3, ["Skin", "Lung"])
    break_it(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match=match) as err:
        load_pannuke(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_pannuke_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Fold"):
        load_pannuke(tmp_path / "nowhere")
