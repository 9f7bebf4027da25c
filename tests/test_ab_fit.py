"""experiments/ab_fit.sh: the same training run timed at two commits, alternating, and cleaned up after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "ab_fit.sh"


def ab_fit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, AB_CACHE_DIR=str(cache))
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )


def worktrees() -> list[str]:
    listing = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True)
    return listing.stdout.splitlines()


def test_ab_fit_names_a_bad_commit_or_round_count(tmp_path):
    done = ab_fit("no-such-commit", "1", "task=rare_disease", cache=tmp_path)
    assert done.returncode == 2
    assert "OLD_COMMIT 'no-such-commit' is not a commit" in done.stderr
    done = ab_fit("HEAD", "two", "task=rare_disease", cache=tmp_path)
    assert done.returncode == 2
    assert "ROUNDS 'two' must be a whole number" in done.stderr


# Two smoke runs of the tiny rare-disease student: about 3 min on the 2 cores.
@pytest.mark.slow
def test_ab_fit_runs_both_sides_with_equal_losses_and_removes_its_worktree(tmp_path):
    before = worktrees()
    done = ab_fit("HEAD", "1", "task=rare_disease", "debug=smoke", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    rows = {words[0]: words[1:] for words in lines if re.fullmatch(r"(new|old)\d+", words[0])}
    assert list(rows) == ["new1", "old1"]
    assert all(float(row[0]) > 0 for row in rows.values())  # fit seconds
    # The same commit on both sides, the same seed: the same losses (deterministic trainer).
    assert rows["new1"][1:] == rows["old1"][1:]
    assert worktrees() == before  # its temporary checkout of the old commit is gone
