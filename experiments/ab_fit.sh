#!/bin/bash
# Time the same training run at two commits, alternating, on one machine: the honest way to see
# what a code change does to a real fit (a benchmark's stand-in step can mislead; experiments/README
# section 6). Runs `python -m mint.run stage=student <args>` (train, no generation) `rounds` times at
# each commit, new then old, and prints each run's fit seconds and final losses.
#
#   experiments/ab_fit.sh OLD_COMMIT ROUNDS mint.run-overrides...
#   experiments/ab_fit.sh 9ac5ef2 2 seed=2 optim=orpo task=rare_disease \
#       experiment=smollm2_rare_disease student.learning_rate=1e-3 trainer.max_steps=30 \
#       task.eval.val_ranking=false
#
# The old commit is checked out in a temporary git worktree and run with this checkout's Python
# (the same packages on both sides);
# both sides share one stage cache (this checkout's outputs/cache, or $AB_CACHE_DIR), so a trunk
# built by one serves the other. Run it on an idle machine: it reports seconds, and anything beside
# it moves them.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 OLD_COMMIT ROUNDS mint.run-overrides..." >&2
  exit 2
fi
old_commit=$1
rounds=$2
shift 2
here=$(git rev-parse --show-toplevel)
python=${PYTHON:-$here/.venv/bin/python}
cache_dir=${AB_CACHE_DIR:-$here/outputs/cache}
git -C "$here" rev-parse --verify --quiet "$old_commit^{commit}" > /dev/null \
  || { echo "$0: OLD_COMMIT '$old_commit' is not a commit of $here" >&2; exit 2; }
case $rounds in
  '' | *[!0-9]* | 0) echo "$0: ROUNDS '$rounds' must be a whole number of at least 1" >&2; exit 2 ;;
esac

work=$(mktemp -d /tmp/mint-ab.XXXXXX)
git -C "$here" worktree add --detach --quiet "$work/old" "$old_commit"
trap 'git -C "$here" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled

echo "new: $(git -C "$here" rev-parse --short HEAD) (with uncommitted changes, if any); old: $old_commit"
echo "run   fit_s   train/loss   val/loss"
for round in $(seq "$rounds"); do
  for side in new old; do
    if [ "$side" = new ]; then code=$here; else code=$work/old; fi
    run_dir=$work/$side$round
    (cd "$code" && "$python" -m mint.run stage=student logger=csv "$@" \
      paths.cache_dir="$cache_dir" hydra.run.dir="$run_dir") > "$run_dir.log" 2>&1 \
      || { echo "$side$round failed: see the log's tail below"; tail -n 20 "$run_dir.log"; exit 1; }
    "$python" - "$run_dir/results.json" "$side$round" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:5} {r['time/student/fit_s']:7.1f}   {r.get('train/loss', float('nan')):.7f}    {r.get('val/loss', float('nan')):.7f}")
EOF
  done
done
