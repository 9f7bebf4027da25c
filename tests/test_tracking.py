"""What a run gives W&B beyond the curves: a predictions table, the preference dataset and the
adapter as artifacts (offline too), and the gradient norm among the training curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb

from mint.data.example_prefs import make_example_prefs, write_jsonl
from mint.data.task_data import spread_indices
from mint.run import run
from mint.stages.teacher import load_task

COLUMNS = ["id", "truth", "answer", "parsed", "truth_rank", "top1", "topk", "format_valid", "car"]


class GradSpy(L.Callback):
    """Test helper: the total gradient norm at each optimizer step before clipping (this hook runs
    just before the module's own) and after it (the clipped gradients are still there at the end of
    the batch), written to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.before: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def norm(module: L.LightningModule) -> float:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self.norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after.append(self.norm(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps({"before": self.before, "after": self.after}))


def test_grad_norm_is_logged_each_step_before_clipping(make_cfg, tmp_path):
    prefs = write_jsonl(make_example_prefs(n=60, seed=2), tmp_path / "prefs.jsonl")
    spy = tmp_path / "spy.json"
    clip = 1e-4
    cfg = make_cfg(
        "task=custom",
        f"task.prefs_path={prefs}",
        "debug=smoke",
        "trainer.max_steps=3",
        f"trainer.gradient_clip_val={clip}",
        "+callbacks.spy._target_=tests.test_tracking.GradSpy",
        f"+callbacks.spy.path={spy}",
    )
    results = run(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        logged = [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r.get("train/grad_norm")]
    seen = json.loads(spy.read_text())
    assert len(logged) == 3 == len(seen["before"])
    assert logged == pytest.approx(seen["before"], rel=1e-5)
    assert min(logged) > 10 * clip  # the gradients before clipping ...
    assert max(seen["after"]) == pytest.approx(clip, rel=1e-3)  # ... were then clipped to clip
    assert results["train/grad_norm"] == pytest.approx(logged[-1], rel=1e-5)


def test_an_offline_wandb_run_gets_the_predictions_table_and_the_artifacts(make_cfg, tmp_path, monkeypatch):
    """A tissue smoke run with W&B offline: a predictions table of the test cases, images included;
    the preference dataset and the adapter logged as artifacts, recorded in the run's .wandb file."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    logged = []
    real = wandb.Run.log_artifact

    def spy(self, artifact, *args, **kwargs):
        logged.append((artifact.name, artifact.type, sorted(artifact.manifest.entries)))
        return real(self, artifact, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log_artifact", spy)
    run_dir = tmp_path / "run"
    # teacher=clip: the tissue default pretrains its tower first (minutes), which this test does not need
    cfg = make_cfg(
        "task=tissue",
        "teacher=clip",
        "debug=smoke",
        "logger=wandb",
        "trainer.max_steps=2",
        output_dir=run_dir,
    )
    run(cfg)

    answered = [
        json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (table_file,) = (offline / "files" / "media" / "table" / "test").glob("predictions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == [*COLUMNS, "image"]
    split = load_task(cfg.task).splits["test"]
    cases = [split[i] for i in spread_indices(len(split), cfg.task.eval.max_samples)]
    assert len(table["data"]) == len(answered) == len(cases) > 0
    assert [a["id"] for a in answered] == [c.id for c in cases]
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert row["id"] == answered[0]["id"] and row["answer"] == answered[0]["answer"]
    assert row["parsed"] == "\n".join(answered[0]["parsed"]) and row["truth"] == answered[0]["truth"]
    # Offline, W&B keeps the table's full form (images as PNG files) in its staging folder until
    # `wandb sync`; the run folder's copy names the cell type only.
    staged = [
        json.loads(p.read_bytes())
        for p in (tmp_path / "wandb_data_dir").rglob("*")
        if p.is_file() and p.read_bytes().startswith(b'{"_type": "table"')
    ]
    full = next(t for t in staged if t["columns"] == table["columns"])
    assert len(full["data"]) == len(cases)
    images = [dict(zip(full["columns"], r, strict=True))["image"] for r in full["data"]]
    assert all(i["_type"] == "image-file" and (i["width"], i["height"]) == (64, 64) for i in images)
    assert len({i["sha256"] for i in images}) == len(cases)  # each case its own image

    names = {name: (kind, files) for name, kind, files in logged}
    dataset = next(n for n in names if n.startswith("prefs-tissue-"))
    adapter = f"adapter-{cfg.logger.wandb.name}"
    assert names[dataset][0] == "dataset" and "prefs.jsonl" in names[dataset][1]
    assert names[adapter][0] == "model" and "adapter_model.safetensors" in names[adapter][1]
    record = next(offline.glob("*.wandb")).read_bytes()
    assert dataset.encode() in record and adapter.encode() in record  # written offline, for `wandb sync`
