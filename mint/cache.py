"""The stage cache: artifacts keyed by a hash of exactly the config that determines them.

`outputs/cache/<stage>/<key>/` holds one artifact (a trained teacher with its
rankings, a preference dataset, ...) plus `manifest.json` (the stage, the key,
the config it was made from, and a sha256 per file). Entries are built in a
temp folder beside their final place and renamed into it, so a killed run
leaves no partial entry (its temp folder is removed by the next build of the same
entry); on read the manifest is checked, so a damaged entry is
rebuilt instead of used. A sweep over methods therefore trains one teacher and
builds one preference set, also when its jobs run in parallel (a lock file per entry).
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mint.files import build_atomically, file_checksums, sha256_hex

log = logging.getLogger("mint.cache")
MANIFEST = "manifest.json"


def config_key(config: Any) -> str:
    """16 hex digits of sha256 over the canonical JSON of `config` (plain dicts/lists/scalars)."""
    return sha256_hex(json.dumps(config, sort_keys=True, default=str))[:16]


def verify(entry: Path) -> bool:
    """True when `entry` has a manifest and every file matches its checksum."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return recorded == file_checksums(entry, skip=MANIFEST)


def cached(root: Path, stage: str, config: Any, make: Callable[[Path], None]) -> Path:
    """The cache entry of `stage` for `config`, made with `make(folder)` unless a valid one exists.

    Processes that want the same entry at the same moment (the jobs of a parallel sweep) take
    turns on a lock file beside it: one builds, the others wait and then read its entry.
    """
    key = config_key(config)
    entry = Path(root) / stage / key
    if entry.is_dir() and verify(entry):
        log.info("%s: reusing %s", stage, entry)
        return entry
    locks = Path(root) / ".locks"  # apart from the entries: a lock file outlives its build
    locks.mkdir(parents=True, exist_ok=True)
    with _exclusive(locks / f"{stage}-{key}.lock", f"{stage} {key}"):
        if entry.is_dir():
            if verify(entry):  # built by the process that held the lock before us
                log.info("%s: reusing %s", stage, entry)
                return entry
            log.warning("%s: cache entry %s fails its manifest check; rebuilding it", stage, entry)
            shutil.rmtree(entry)
        # Builds of this entry hold this lock, so a temp folder of it found now was left by a
        # killed build (kill -9 skips build_atomically's clean-up): a trunk's can be 0.5 GB.
        for stale in entry.parent.glob(f".{key}.tmp-*"):
            log.info("%s: removing %s, left by a killed build", stage, stale)
            shutil.rmtree(stale, ignore_errors=True)

        def make_with_manifest(folder: Path) -> None:
            make(folder)
            manifest = {
                "stage": stage,
                "key": key,
                "config": config,
                "files": file_checksums(folder, skip=MANIFEST),
            }
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")

        # Another process (one not using this lock, e.g. on a file system without locks) may still
        # finish the same entry first; a verified one is as good as ours.
        build_atomically(entry, make_with_manifest, complete=verify)
    log.info("%s: built %s", stage, entry)
    return entry


@contextmanager
def _exclusive(path: Path, what: str) -> Iterator[None]:
    """An exclusive `flock` on `path` for the duration. The kernel releases it when its process
    dies, so a killed build never leaves a lock that blocks the next run (the file stays, unlocked)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is building it; waiting", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
