"""task=custom reads preference data as researchers hold it: JSON, Parquet, CSV, a folder of data
files (with its splits) or a Hub id, through datasets.load_dataset, validated row by row as JSONL is."""

from __future__ import annotations

import json

import datasets
import pytest

from mint.pairs.rows import read_preference_rows
from mint.stages.prefs import custom_rows

STANDARD = [
    {"prompt": f"Note {i}: short stature.", "chosen": " Velmora syndrome", "rejected": " Other syndrome"}
    for i in range(4)
]
CONVERSATIONAL = [
    {
        "id": f"p{i}",
        "prompt": [{"role": "user", "content": f"Note {i}"}],
        "chosen": [{"role": "assistant", "content": "Velmora syndrome"}],
        "rejected": [{"role": "assistant", "content": "Other syndrome"}],
    }
    for i in range(4)
]


def write(path, rows, form):
    table = datasets.Dataset.from_list(rows)
    if form == "json":
        path.write_text(json.dumps(rows))
    elif form == "parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("form", ["json", "parquet"])
def test_json_and_parquet_files_hold_conversational_rows(tmp_path, form):
    path = write(tmp_path / f"prefs.{form}", CONVERSATIONAL, form)
    assert read_preference_rows(path) == CONVERSATIONAL


def test_a_csv_file_holds_standard_rows(tmp_path):
    path = write(tmp_path / "prefs.csv", STANDARD, "csv")
    assert read_preference_rows(path) == STANDARD


def test_a_bad_row_is_named_by_file_and_row_as_in_jsonl(tmp_path):
    bad = [*STANDARD[:2], {**STANDARD[2], "rejected": STANDARD[2]["chosen"]}]
    path = write(tmp_path / "prefs.parquet", bad, "parquet")
    with pytest.raises(ValueError, match=r"prefs\.parquet: row 2: key 'rejected': identical"):
        read_preference_rows(path)
    assert len(read_preference_rows(path, on_error="skip")) == 2


def test_a_broken_file_is_named(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('{"prompt": "unterminated')
    with pytest.raises(ValueError, match=r"prefs\.json: cannot read it as a dataset"):
        read_preference_rows(path)


def test_a_folder_of_data_files_reads_the_chosen_split(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.parquet", CONVERSATIONAL[:3], "parquet")
    write(folder / "test.parquet", CONVERSATIONAL[3:], "parquet")
    assert read_preference_rows(folder) == CONVERSATIONAL[:3]
    assert read_preference_rows(folder, split="test") == CONVERSATIONAL[3:]


def test_custom_task_reads_a_parquet_file_and_its_split_key(make_cfg, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.parquet", CONVERSATIONAL * 3, "parquet")
    write(folder / "validation.parquet", CONVERSATIONAL, "parquet")
    cfg = make_cfg("task=custom", f"task.prefs_path={folder}", "task.prefs_split=validation")
    rows = custom_rows(cfg.task, seed=0)
    assert len(rows.train) + len(rows.val) == len(CONVERSATIONAL)


def test_a_hub_id_is_refused_offline_naming_the_setting(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg("task=custom", "task.prefs_path=trl-lib/ultrafeedback_binarized")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        custom_rows(cfg.task, seed=0)
