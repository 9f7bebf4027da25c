"""The stage cache: build once, reuse, never use a partial or damaged entry."""

import json

import pytest

from mint.cache import cached, config_key, verify


def test_builds_once_per_config_and_reuses(tmp_path):
    calls = []

    def make(folder):
        calls.append(folder)
        (folder / "scores.txt").write_text("0.1 0.9")

    a = cached(tmp_path, "teacher", {"lr": 1e-3, "folds": 5}, make)
    b = cached(tmp_path, "teacher", {"folds": 5, "lr": 1e-3}, make)  # same config, other key order
    c = cached(tmp_path, "teacher", {"lr": 1e-4, "folds": 5}, make)
    assert a == b != c and len(calls) == 2
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["config"] == {"lr": 1e-3, "folds": 5} and "scores.txt" in manifest["files"]
    assert a.name == config_key({"lr": 1e-3, "folds": 5})


def test_a_killed_build_leaves_nothing_and_the_next_run_builds(tmp_path):
    def crash(folder):
        (folder / "half.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt  # what a kill looks like from inside

    with pytest.raises(KeyboardInterrupt):
        cached(tmp_path, "prefs", {"k": 10}, crash)
    assert list((tmp_path / "prefs").iterdir()) == []

    entry = cached(tmp_path, "prefs", {"k": 10}, lambda f: (f / "data.jsonl").write_text("{}\n"))
    assert verify(entry)


def test_a_damaged_entry_is_rebuilt(tmp_path):
    entry = cached(tmp_path, "prefs", {"k": 10}, lambda f: (f / "data.jsonl").write_text("{}\n"))
    (entry / "data.jsonl").write_text("tampered\n")
    assert not verify(entry)
    again = cached(tmp_path, "prefs", {"k": 10}, lambda f: (f / "data.jsonl").write_text("{}\n"))
    assert again == entry and verify(again) and (again / "data.jsonl").read_text() == "{}\n"
