"""What a change did to one method, case by case: its runs in two comparisons, on the same seeds.

    python experiments/paired_between.py experiments/results/rare_disease_paired \
        experiments/results/rare_disease_decay2 --methods sft orpo

For each method, the runs `runs/methods/<method>_seed<S>` (or `runs/ablations/...`) of the two
comparison folders (`--out` of experiments/compare.py) on the seeds both have: the second folder's
top-1 minus the first's on the same test cases, mean over seeds, 95% paired bootstrap CI (cases
resampled within each seed) and the seeds on which the second is ahead, as compare.py's
comparison_paired.csv computes them for ORPO against the other methods.

Two methods of one comparison, case by case: `A:B` compares the first folder's runs of A with the
second's of B (the same folder twice for one comparison):

    python experiments/paired_between.py experiments/results/rare_disease_decay2 \
        experiments/results/rare_disease_decay2 --methods orpo_truth_first:sft_truth_first
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import RunResult, paired_differences  # noqa: E402

RUN = re.compile(r"(?P<method>.+)_seed(?P<seed>\d+)")


def runs_of(folder: Path, method: str, label: str) -> list[RunResult]:
    """The method's finished runs in one comparison folder, named `label`."""
    runs = []
    for run in sorted((folder / "runs").glob(f"*/{method}_seed*")):
        found = RUN.fullmatch(run.name)
        if found and found["method"] == method and (run / "eval" / "predictions.jsonl").is_file():
            runs.append(
                RunResult(method=label, kind="student", seed=int(found["seed"]), values={}, folder=run)
            )
    return runs


def method_pair(method: str) -> tuple[str, str]:
    """ "A" -> (A, A): the same method in both folders; "A:B" -> (A, B): A in before, B in after."""
    before_method, _, after_method = method.partition(":")
    return before_method, after_method or before_method


def compare_folders(before: Path, after: Path, methods: list[str], metric: str = "top1") -> list[dict]:
    rows = []
    for method in methods:
        before_method, after_method = method_pair(method)
        runs = runs_of(before, before_method, "before") + runs_of(after, after_method, "after")
        found = paired_differences(runs, reference="after", metric=metric)
        if not found:
            raise SystemExit(f"{method}: no seed with finished runs in both {before} and {after}")
        rows.append({**found[0], "method": method})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="comparison folder without the change")
    parser.add_argument("after", type=Path, help="comparison folder with it")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["sft", "orpo"],
        help="method names, or A:B for A in before against B in after",
    )
    parser.add_argument("--metric", default="top1", help="a per-case 0/1 key of eval/predictions.jsonl")
    args = parser.parse_args()
    print(f"{args.metric}: {args.after} minus {args.before}, case by case")
    for row in compare_folders(args.before, args.after, args.methods, args.metric):
        before_method, after_method = method_pair(row["method"])
        label = before_method if after_method == before_method else f"{after_method} minus {before_method}"
        print(
            f"{label}: {row['diff_mean']:+.3f} [{row['diff_ci_low']:+.3f}, {row['diff_ci_high']:+.3f}]"
            f" over {row['n_seeds']} seeds, ahead on {row['seeds_ahead']}"
        )


if __name__ == "__main__":
    main()
