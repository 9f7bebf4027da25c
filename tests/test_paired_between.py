"""experiments/paired_between.py: one method's runs in two comparisons, case by case."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_experiment

paired_between = load_experiment("paired_between")


def _run(folder, method: str, seed: int, hits: list[int], kind: str = "methods") -> None:
    run = folder / "runs" / kind / f"{method}_seed{seed}" / "eval"
    run.mkdir(parents=True)
    lines = [json.dumps({"id": f"case{i}", "top1": bool(hit)}) for i, hit in enumerate(hits)]
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def test_the_second_folder_minus_the_first_on_the_same_cases(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    _run(before, "orpo", 1, [0, 0, 1, 0])
    _run(after, "orpo", 1, [1, 0, 1, 1])  # +0.5 on seed 1
    _run(before, "orpo", 2, [1, 1, 0, 0])
    _run(after, "orpo", 2, [1, 1, 0, 0])  # level on seed 2
    _run(after, "orpo", 3, [1, 1, 1, 1])  # seed 3 only in one folder: left out
    _run(before, "orpo_unimodal", 1, [1, 1, 1, 1], kind="ablations")
    _run(after, "orpo_unimodal", 1, [0, 1, 1, 1], kind="ablations")
    rows = paired_between.compare_folders(before, after, ["orpo", "orpo_unimodal"])
    assert [(r["method"], r["n_seeds"], r["seeds_ahead"]) for r in rows] == [
        ("orpo", 2, 1),
        ("orpo_unimodal", 1, 0),
    ]
    assert rows[0]["diff_mean"] == pytest.approx(0.25) and rows[1]["diff_mean"] == pytest.approx(-0.25)
    assert rows[0]["diff_ci_low"] <= 0.25 <= rows[0]["diff_ci_high"]
    with pytest.raises(SystemExit, match="sft: no seed"):
        paired_between.compare_folders(before, after, ["sft"])


def test_two_methods_of_one_comparison_case_by_case(tmp_path):
    """`A:B`: B minus A on the same cases, here within one folder (SFT and ORPO on the same lists)."""
    folder = tmp_path / "cmp"
    _run(folder, "orpo_truth_first", 1, [0, 1, 1, 0], kind="ablations")
    _run(folder, "sft_truth_first", 1, [1, 1, 1, 1], kind="ablations")
    _run(folder, "orpo_truth_first", 2, [1, 1, 1, 1], kind="ablations")
    _run(folder, "sft_truth_first", 2, [1, 1, 1, 0], kind="ablations")
    (row,) = paired_between.compare_folders(folder, folder, ["orpo_truth_first:sft_truth_first"])
    assert row["method"] == "orpo_truth_first:sft_truth_first"
    assert (row["n_seeds"], row["seeds_ahead"]) == (2, 1)
    assert row["diff_mean"] == pytest.approx((0.5 - 0.25) / 2)
    with pytest.raises(SystemExit, match="orpo_truth_first:sft_truth: no seed"):
        paired_between.compare_folders(folder, folder, ["orpo_truth_first:sft_truth"])
