"""Simulated rare-disease patients, the GMDB-format loader and the HPO-overlap ranker."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mint.data import hpo_sim
from mint.data.gmdb import GMDBFormatError, load_gmdb
from mint.data.omim import disease_annotations
from mint.data.rare_disease import simulate_rare_disease
from mint.data.task_data import SPLITS, TaskData

# The overlap ranker is reference code of the calibration script, kept beside it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from hpo_overlap import TermOverlapRanker, evaluate_ranker, rank_by_term_overlap  # noqa: E402

SMALL = {"n_diseases": 8, "patients_per_disease": 10}
GMDB_DISEASES = ["Cornelia de Lange syndrome", "Kabuki syndrome", "Noonan syndrome"]  # sorted


@pytest.fixture(scope="module")
def task() -> TaskData:
    return simulate_rare_disease(**SMALL, seed=0)


def test_same_seed_same_data_other_seed_other_data(task: TaskData) -> None:
    assert simulate_rare_disease(**SMALL, seed=0).fingerprint() == task.fingerprint()
    other = simulate_rare_disease(**SMALL, seed=1)
    assert other.fingerprint() != task.fingerprint()
    assert other.labels == task.labels  # the panel is fixed by panel_seed, not seed


def test_splits_are_patient_level_and_stratified(task: TaskData) -> None:
    ids = [s.id for split in SPLITS for s in task.splits[split]]
    assert len(ids) == len(set(ids)) == 8 * 10
    for split in SPLITS:
        assert all(n > 0 for n in task.label_counts(split).values()), split


def test_only_phenotypic_abnormality_terms(task: TaskData) -> None:
    root = hpo_sim.ontology().get_hpo_object("HP:0000118")
    for sample in task.splits["train"]:
        shown = sample.meta["hpo_ids"] + sample.meta["negated_hpo_ids"]
        assert shown
        for term_id in shown:
            assert hpo_sim.ontology().get_hpo_object(term_id).child_of(root), (sample.id, term_id)
    for names in disease_annotations(task).values():
        assert names and not any("inheritance" in n.lower() for n in names)


def test_clinical_synonyms_name_phenotypic_terms() -> None:
    for term_id, synonyms in hpo_sim.CLINICAL_SYNONYMS.items():
        assert hpo_sim.is_phenotypic(term_id) and synonyms, term_id


def test_notes_are_varied_sentences(task: TaskData) -> None:
    notes = [s.text for split in SPLITS for s in task.splits[split]]
    assert len(set(notes)) == len(notes)
    for note in notes:
        sentences = re.split(r"(?<=\.)\s+", note)
        assert (note[0].isupper() or note[0].isdigit()) and note.endswith(".") and len(sentences) >= 2, note
        assert re.search(r"\d+-(month|year)-old (boy|girl|man|woman|male infant|female infant)", note), note
    openings = {" ".join(n.split()[:3]) for n in notes}
    assert len(openings) >= 5


def test_disease_names_are_readable_and_distinct(task: TaskData) -> None:
    def norm(name: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", "", name.lower()).split())

    for i, a in enumerate(task.labels):
        assert not re.search(r"\s\d+$", a), a  # no subtype numbers left
        for b in task.labels[i + 1 :]:
            assert difflib.SequenceMatcher(None, norm(a), norm(b)).ratio() < 0.8, (a, b)


def nearest_centroid_accuracy(data: TaskData) -> float:
    train = data.splits["train"]
    centroids = np.stack(
        [np.mean([s.vector for s in train if s.label == c], axis=0) for c in range(len(data.labels))]
    )
    test = data.splits["test"]
    vectors = np.stack([s.vector for s in test])
    predicted = np.argmin(((vectors[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(predicted == np.array([s.label for s in test])))


def test_gestalt_vector_carries_class_information_unless_noise_drowns_it(task: TaskData) -> None:
    sample = task.splits["train"][0]
    assert sample.vector.dtype == np.float32 and sample.vector.shape == (64,)
    sizes = {"n_diseases": 8, "patients_per_disease": 30}
    chance = 1 / 8
    assert nearest_centroid_accuracy(simulate_rare_disease(**sizes)) > 3 * chance
    assert nearest_centroid_accuracy(simulate_rare_disease(**sizes, gestalt_noise=100.0)) < 2.5 * chance


class _Untouchable(dict):
    """A meta that fails the test if anything reads it."""

    def __getitem__(self, key: object) -> object:
        raise AssertionError(f"the ranker read meta[{key!r}]")

    def get(self, key: object, default: object = None) -> object:
        raise AssertionError(f"the ranker read meta[{key!r}]")


def test_overlap_ranker_reads_only_the_note(task: TaskData) -> None:
    annotations = disease_annotations(task)
    for sample in task.splits["test"][:5]:
        ranking = rank_by_term_overlap(sample, annotations)
        assert sorted(ranking) == sorted(task.labels)
        blind = dataclasses.replace(sample, meta=_Untouchable())
        assert (
            rank_by_term_overlap(blind, annotations)
            == ranking
            == rank_by_term_overlap(sample.text, annotations)
        )
    scores = evaluate_ranker(task, "test", k=3)
    assert 0.0 <= scores["top1"] <= scores["topk"] <= 1.0


def test_overlap_ranker_finds_stated_and_skips_negated_findings() -> None:
    ranker = TermOverlapRanker({"A": ["Hypertelorism", "Cleft palate"], "B": ["Ptosis", "Seizure"]})
    note = "A 3-year-old boy with widely spaced eyes. He also has seizures. There is no ptosis."
    assert ranker.findings(note) == {316, 1250}  # hypertelorism, seizure; ptosis negated
    assert ranker.rank("Physical examination revealed drooping eyelids.") == ["B", "A"]


def _write_gmdb(root: Path, *, with_split: bool = False) -> None:
    (root / "images").mkdir(parents=True)
    rows = []
    for d, disease in enumerate(GMDB_DISEASES):
        for p in range(5):
            image_id = f"img{d}{p}"
            colour = (40 * d, 50 * p, 200)
            suffix = ".png" if p % 2 else ".jpg"
            Image.new("RGB", (40 + p, 30), colour).save(root / "images" / f"{image_id}{suffix}")
            row = {
                "image_id": image_id,
                "disease": disease,
                "clinical_text": f"Patient {p} with findings.",
                "age": str(p + 1),
                "sex": "female",
            }
            if with_split:
                row["split"] = SPLITS[p % 3]
            rows.append(row)
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_gmdb_loader_reads_a_written_folder(tmp_path: Path) -> None:
    _write_gmdb(tmp_path)
    data = load_gmdb(tmp_path, image_size=32)
    assert data.name == "rare_disease" and data.labels == GMDB_DISEASES
    sample = data.splits["train"][0]
    assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
    assert sample.meta["age_years"] > 0 and sample.text.startswith("Patient")
    assert all(len(data.splits[s]) > 0 for s in SPLITS)
    assert load_gmdb(tmp_path, image_size=32).fingerprint() == data.fingerprint()
    # the knowledge base finds OMIM entries by name ("Noonan syndrome" -> a Noonan syndrome N)
    assert all(len(names) > 5 for names in disease_annotations(data).values())
    unknown = dataclasses.replace(data, labels=[*GMDB_DISEASES[:2], "No such syndrome"])
    with pytest.raises(ValueError, match="No such syndrome"):
        disease_annotations(unknown)

    split_root = tmp_path / "with_split"
    _write_gmdb(split_root, with_split=True)
    by_column = load_gmdb(split_root, image_size=16)
    assert {s.id for s in by_column.splits["val"]} == {f"img{d}{p}" for d in range(3) for p in (1, 4)}


def _rewrite_csv(root: Path, edit) -> None:
    path = root / "metadata.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = edit(rows)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _latin1_on_line_3(root: Path) -> None:
    """A metadata.csv saved in Latin-1 with an accented disease name on its third line."""
    lines = (root / "metadata.csv").read_text().splitlines(keepends=True)
    lines[2] = (
        lines[2].replace("syndrome", "syndr\xf4me", 1) if "syndrome" in lines[2] else lines[2][:-1] + "\xe9\n"
    )
    (root / "metadata.csv").write_bytes("".join(lines).encode("latin-1"))


def _drop_column(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "sex"} for row in rows]


def _empty_disease(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    rows[2]["disease"] = ""
    return rows


def _bad_split(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**row, "split": "holdout" if i == 3 else "train"} for i, row in enumerate(rows)]


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda root: (root / "metadata.csv").unlink(), "metadata.csv: not found"),
        (lambda root: _rewrite_csv(root, _drop_column), "missing column(s) ['sex']"),
        (lambda root: _rewrite_csv(root, _empty_disease), "line 4: empty disease"),
        (lambda root: _rewrite_csv(root, _bad_split), "split 'holdout'"),
        (lambda root: (root / "images" / "img00.jpg").unlink(), "no image for image_id 'img00'"),
        (lambda root: _latin1_on_line_3(root), "metadata.csv: line 3, column"),
        (
            lambda root: (root / "images" / "img01.png").write_bytes(b"not a png"),
            "img01.png: not a decodable",
        ),
    ],
)
def test_gmdb_loader_names_what_is_wrong(tmp_path: Path, break_it, expected: str) -> None:
    _write_gmdb(tmp_path)
    break_it(tmp_path)
    with pytest.raises(GMDBFormatError) as info:
        load_gmdb(tmp_path, image_size=16)
    assert expected in str(info.value) and "expected layout" in str(info.value)


def test_gmdb_loader_missing_root(tmp_path: Path) -> None:
    with pytest.raises(GMDBFormatError, match="no such folder"):
        load_gmdb(tmp_path / "nowhere")
