"""Fitting a teacher: cross-fitted folds, out-of-fold rankings of every label for every sample.

Any `TeacherModule` runs through `fit_teacher`: the rare-disease fusion
teacher, the tissue CLIP-style teacher. It returns (and writes to `out_dir`)
a score matrix [N, C] per split. Training-split scores are cross-fitted: each
training sample is scored by a teacher that never saw it, because ranked
in-sample the teacher is right ~100% of the time and the preference builder's
`chosen` would collapse into a copy of the label.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pickle
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mint.data.task_data import SPLITS, Sample, TaskData
from mint.files import build_atomically
from mint.metrics import ranking_metrics, ranks

log = logging.getLogger(__name__)

# What a teacher fit gets unless trainer_kwargs says otherwise. Our own bar (one per
# fold) replaces Lightning's per-epoch bars; sanity validation would only cost time.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 40,
    "deterministic": True,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}


class DictDataset(Dataset):
    """Columns of equal length (tensors or lists) -> one dict per row; default_collate batches them."""

    def __init__(self, columns: dict[str, torch.Tensor | list[Any]]) -> None:
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns = columns
        self.length = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: column[index] for name, column in self.columns.items()}


class TeacherModule(L.LightningModule):
    """What `fit_teacher` needs from a teacher.

    Subclasses implement `forward(batch) -> logits [B, C]` (C = number of labels,
    higher = more likely) and `make_dataset(samples)` whose rows carry a `label`
    column. `make_dataset` must depend on the teacher's configuration only, not on
    its weights: the stage builds each split's dataset once and reuses it for every
    fold's fresh teacher. The default training loss is cross-entropy; a contrastive
    teacher overrides `training_step`.
    """

    eval_k: int = 10  # the task's list length; the stage sets it before fitting

    def make_dataset(self, samples: Sequence[Sample]) -> Dataset:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch)
        labels = batch["label"]
        rank = torch.from_numpy(ranks(logits.float().cpu().numpy(), labels.cpu().numpy())).float()
        n = len(labels)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=n)
        self.log("val/top1", (rank <= 1).float().mean(), batch_size=n)
        self.log("val/topk", (rank <= self.eval_k).float().mean(), batch_size=n)
        self.log("val/mrr", (1.0 / rank).mean(), batch_size=n)
        # Top-10 of 30 saturates at 1.0 within an epoch or two, and early stopping on it alone
        # would keep that undertrained epoch. Breaking ties by MRR keeps selection on top-k
        # (an MRR change moves the sum by < 1e-4, less than one val sample's top-k hit).
        self.log(
            "val/topk_then_mrr",
            (rank <= self.eval_k).float().mean() + 1e-4 * (1.0 / rank).mean(),
            batch_size=n,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self(batch).float()


def adamw_cosine(
    module: L.LightningModule, params: Iterable[Any], lr: float, weight_decay: float
) -> dict[str, Any]:
    """AdamW over `params` (tensors or param groups) with a per-step cosine decay over the whole fit.

    Returns Lightning's configure_optimizers shape; call it from there (it reads the trainer).
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def stratified_folds(labels: Sequence[int], folds: int, seed: int) -> np.ndarray:
    """Fold index per sample; each class is shuffled and dealt round-robin across folds.

    The deal continues where the previous class stopped, so fold sizes stay
    balanced even when classes have fewer members than there are folds.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        out[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return out


@dataclass
class TeacherResult:
    """A finished teacher stage: per-split scores [N, C] in task.splits order, ids, metrics."""

    out_dir: Path
    labels: list[str]
    ids: dict[str, list[str]]
    targets: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    metrics: dict[str, float]
    checkpoint: Path

    def ranked_indices(self, split: str) -> np.ndarray:
        """[N, C] label indices, best first (stable: ties keep label order)."""
        return np.argsort(-self.scores[split], axis=1, kind="stable")

    def ranked_labels(self, split: str, i: int) -> list[str]:
        """Every label name for sample i of `split`, best first."""
        order = np.argsort(-self.scores[split][i], kind="stable")
        return [self.labels[j] for j in order]

    @classmethod
    def load(cls, out_dir: str | Path) -> TeacherResult:
        out_dir = Path(out_dir)
        return cls(
            out_dir=out_dir,
            labels=json.loads((out_dir / "labels.json").read_text()),
            ids={s: json.loads((out_dir / f"ids_{s}.json").read_text()) for s in SPLITS},
            targets={s: np.load(out_dir / f"targets_{s}.npy") for s in SPLITS},
            scores={s: np.load(out_dir / f"scores_{s}.npy") for s in SPLITS},
            metrics=json.loads((out_dir / "metrics.json").read_text()),
            checkpoint=out_dir / "teacher.ckpt",
        )


class _FoldBar(Callback):
    """One tqdm bar per fit, advanced per epoch, showing the monitored metric."""

    def __init__(self, desc: str, monitor: str) -> None:
        self.desc = desc
        self.monitor = monitor
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self.bar = tqdm(total=total, desc=self.desc, unit="epoch", leave=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None and not trainer.sanity_checking:
            self.bar.update(1)
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self.bar.set_postfix({self.monitor: f"{float(value):.3f}"})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the per-Trainer banner and the few-workers warnings: the stage builds up to 6 Trainers."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class FitSpec:
    make_teacher: Callable[[TaskData], TeacherModule]
    trainer_kwargs: dict[str, Any]
    batch_size: int
    k: int
    patience: int
    monitor: str


def load_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint, unpickled with weights_only=True.

    A checkpoint is data: the restricted unpickler accepts tensors and plain containers and
    refuses anything that would run code on load (a tampered or foreign file).
    """
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"{path}: refusing to load a checkpoint that holds more than weights and plain data ({err})"
        ) from err
    return checkpoint["state_dict"]


def fit_one(
    spec: FitSpec,
    task: TaskData,
    train: Dataset,
    val: Dataset,
    *,
    seed: int,
    ckpt_dir: Path,
    desc: str,
    progress: bool = True,
) -> tuple[TeacherModule, L.Trainer, Path]:
    """Fit a fresh teacher on `train`, early-stopped on `val`, and restore its best epoch.

    progress: a bar advanced per epoch (off where several fits run at once: see `run_fits`)."""
    L.seed_everything(seed, workers=True, verbose=False)
    teacher = spec.make_teacher(task)
    teacher.eval_k = spec.k
    kwargs = TRAINER_DEFAULTS | spec.trainer_kwargs
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=spec.monitor,
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    callbacks = [
        EarlyStopping(monitor=spec.monitor, mode="max", patience=spec.patience),
        checkpoint,
        *([_FoldBar(desc, spec.monitor)] if progress else []),
        *kwargs.pop("callbacks", []),
    ]
    trainer = L.Trainer(**kwargs, callbacks=callbacks)
    generator = torch.Generator().manual_seed(seed)
    # A last batch of one sample would break BatchNorm in a CNN branch; dropping it costs nothing.
    drop_last = len(train) % spec.batch_size == 1
    train_loader = DataLoader(
        train, batch_size=spec.batch_size, shuffle=True, generator=generator, drop_last=drop_last
    )
    val_loader = DataLoader(val, batch_size=spec.batch_size)
    trainer.fit(teacher, train_loader, val_loader)
    best = Path(checkpoint.best_model_path)
    teacher.load_state_dict(load_state_dict(best, teacher.device))
    log.info(
        "%s: %d epochs, best %s=%.4f", desc, trainer.current_epoch, spec.monitor, checkpoint.best_model_score
    )
    return teacher, trainer, best


def _predict(
    teacher: TeacherModule, trainer: L.Trainer, data: Dataset, batch_size: int, n_labels: int
) -> np.ndarray:
    if len(data) == 0:
        return np.zeros((0, n_labels), dtype=np.float32)
    outputs = trainer.predict(teacher, DataLoader(data, batch_size=batch_size))
    return torch.cat(outputs).cpu().numpy().astype(np.float32)


@dataclass(frozen=True)
class FitJob:
    """One fit of the teacher stage: the full teacher, or one cross-fit fold."""

    desc: str
    seed: int
    workdir: Path  # its checkpoints while it trains; removed after
    fit_rows: list[int] | None = None  # rows of the train split it fits on (None: all)
    score: dict[str, list[int] | None] = field(default_factory=dict)  # split -> rows it scores (None: all)
    keep_checkpoint: Path | None = None  # where its best epoch's weights go (None: deleted)


def _fold_jobs(task: TaskData, folds: int, *, seed: int, workdir: Path) -> list[FitJob]:
    """The cross-fit: each of `folds` stratified folds of train scored by a fresh teacher fit on
    the other folds (early-stopped on the same val split); none when folds < 2."""
    if folds < 2:
        return []
    fold_of = stratified_folds([s.label for s in task.splits["train"]], folds, seed)
    return [
        FitJob(
            f"teacher fold {fold + 1}/{folds}",
            seed + 1 + fold,
            workdir / f"fit_fold{fold}",
            fit_rows=np.flatnonzero(fold_of != fold).tolist(),
            score={"train": np.flatnonzero(fold_of == fold).tolist()},
        )
        for fold in range(folds)
    ]


def run_job(
    spec: FitSpec, task: TaskData, data: dict[str, Dataset], job: FitJob, *, progress: bool = True
) -> dict[str, Any]:
    """Fit one job and score its splits: {"scores": {split: [N, C]}, "epochs": int}."""
    train = data["train"] if job.fit_rows is None else Subset(data["train"], job.fit_rows)
    teacher, trainer, best = fit_one(
        spec, task, train, data["val"], seed=job.seed, ckpt_dir=job.workdir, desc=job.desc, progress=progress
    )
    scores = {
        split: _predict(
            teacher,
            trainer,
            data[split] if rows is None else Subset(data[split], rows),
            spec.batch_size,
            len(task.labels),
        )
        for split, rows in job.score.items()
    }
    if job.keep_checkpoint is not None:
        best.rename(job.keep_checkpoint)
    shutil.rmtree(job.workdir, ignore_errors=True)
    return {"scores": scores, "epochs": trainer.current_epoch}


# What forked workers read instead of a pickled copy: set by `run_fits` just before the fork.
_FORK_STATE: dict[str, Any] = {}


def _run_forked_job(job: FitJob) -> dict[str, Any]:
    state = _FORK_STATE
    with torch_threads(state["threads"]):
        return run_job(state["spec"], state["task"], state["data"], job, progress=False)


def run_fits(
    spec: FitSpec,
    task: TaskData,
    data: dict[str, Dataset],
    jobs: Sequence[FitJob],
    *,
    threads: int | None,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """`run_job` over `jobs`, in order; with workers > 1 in that many forked processes at once.

    Every fit seeds itself and runs single-process either way, so a job's scores do not depend
    on `workers` (a test checks they are equal bit for bit). The workers are forked, not spawned:
    they share the parent's featurized datasets and imports instead of re-importing torch
    (~10 s each). The caller checks that the fits run on the CPU (a forked CUDA context fails).
    """
    if workers <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
        with torch_threads(threads):
            return [run_job(spec, task, data, job) for job in jobs]
    _FORK_STATE.update(spec=spec, task=task, data=data, threads=threads)
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_run_forked_job, job) for job in jobs]
            with tqdm(
                total=len(jobs), desc=f"teacher fits ({workers} at once)", unit="fit", leave=False
            ) as bar:
                for future in as_completed(futures):
                    if future.exception() is not None:
                        # Fail now, not after the fits still queued: a failed fit fails the stage.
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise future.exception()
                    bar.update(1)
            return [future.result() for future in futures]
    finally:
        _FORK_STATE.clear()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_teacher(
    task: TaskData,
    *,
    make_teacher: Callable[[TaskData], TeacherModule],
    trainer_kwargs: dict[str, Any],
    batch_size: int,
    folds: int = 5,
    k: int,
    out_dir: str | Path,
    seed: int,
    patience: int = 5,
    monitor: str = "val/topk_then_mrr",
    n_boot: int = 1000,
    fit_threads: int | None = 1,
    fit_workers: int = 1,
) -> TeacherResult:
    """Train the teacher on train (early-stopped on val), score every split, save into out_dir.

    - val / test scores: the teacher fit on all of train, restored to its best `monitor` epoch
      (default: val top-k, ties broken by val MRR; any logged `val/...` maximised works).
    - train scores: cross-fitted over `folds` stratified folds; each fold is scored by a fresh
      teacher fit on the other folds (early-stopped on the same val split). `folds` 0 or 1
      scores train in-sample with the full teacher: wrong for MINT (near-100% top-1), kept
      only for debugging.
    - k is the task's list length (10 rare disease, 5 tissue): `val/topk` and `teacher/*/topk`.
    - fit_threads: torch intra-op threads while fitting and scoring (None: leave the process
      setting). 1 suits the small MLP/attention teachers on shared CPUs: a second thread only
      adds synchronisation (measured ~7x slower tests on 2 busy cores). Featurizing (MiniLM)
      keeps the process setting. On 2 busy cores 1 thread also won for a narrow CNN (1.5 s vs
      35 s an epoch); use None on GPUs and on machines with idle cores.
    - fit_workers: how many of the 1 + `folds` fits run at once, each in a forked process
      (`run_fits`); the scores are the same for any value. On a CPU with idle cores, up to
      cores / fit_threads; 1 on a GPU.
    Writes atomically (`mint.files.build_atomically`): a temp folder next to out_dir, renamed
    into place when complete; a result already in out_dir is replaced.
    """
    if not task.splits["val"] or not task.splits["train"]:
        raise ValueError(
            f"teacher stage on {task.name!r} needs train and val samples (val drives early stopping)"
        )
    started = time.perf_counter()
    spec = FitSpec(make_teacher, dict(trainer_kwargs), batch_size, k, patience, monitor)
    n_labels = len(task.labels)

    def make(tmp: Path) -> None:
        with quiet_lightning():
            clock = time.perf_counter()
            featurizer = make_teacher(task)
            data = {split: featurizer.make_dataset(task.splits[split]) for split in SPLITS}
            del featurizer
            timings = {"featurize_s": time.perf_counter() - clock}

            clock = time.perf_counter()
            if folds < 2:
                log.warning("teacher: folds=%d scores TRAIN IN-SAMPLE; rankings will be near-perfect", folds)
            full = FitJob(
                "teacher full",
                seed,
                tmp / "fit_full",
                score=dict.fromkeys(["val", "test", *(["train"] if folds < 2 else [])]),
                keep_checkpoint=tmp / "teacher.ckpt",
            )
            jobs = [full, *_fold_jobs(task, folds, seed=seed, workdir=tmp)]
            log.info(
                "teacher: %d fits (all %d training samples%s), %d at a time",
                len(jobs),
                len(data["train"]),
                f", then {folds} cross-fit folds" if folds >= 2 else "",
                max(1, min(fit_workers, len(jobs))),
            )
            outcomes = run_fits(spec, task, data, jobs, threads=fit_threads, workers=fit_workers)
            scores = outcomes[0]["scores"]
            epochs_full = outcomes[0]["epochs"]
            if folds >= 2:
                oof = np.zeros((len(task.splits["train"]), n_labels), dtype=np.float32)
                for job, outcome in zip(jobs[1:], outcomes[1:], strict=True):
                    oof[job.score["train"]] = outcome["scores"]["train"]
                scores["train"] = oof
            timings["fits_s"] = time.perf_counter() - clock

        targets = {split: np.array([s.label for s in task.splits[split]], dtype=np.int64) for split in SPLITS}
        metrics: dict[str, float] = {
            "teacher/k": k,
            "teacher/folds": folds,
            "teacher/epochs_full": epochs_full,
        }
        for split, prefix in (
            ("val", "teacher/val"),
            ("test", "teacher/test"),
            ("train", "teacher/train_oof"),
        ):
            if len(targets[split]):
                metrics |= ranking_metrics(scores[split], targets[split], k, prefix, n_boot=n_boot, seed=seed)
        timings["total_s"] = time.perf_counter() - started
        metrics |= {f"teacher/time/{name}": round(value, 3) for name, value in timings.items()}

        for split in SPLITS:
            np.save(tmp / f"scores_{split}.npy", scores[split])
            np.save(tmp / f"targets_{split}.npy", targets[split])
            (tmp / f"ids_{split}.json").write_text(json.dumps([s.id for s in task.splits[split]]))
        (tmp / "labels.json").write_text(json.dumps(task.labels))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))

    result = TeacherResult.load(build_atomically(Path(out_dir), make, replace=True))
    log.info(
        "teacher: test top1=%.3f top%d=%.3f, train OOF top1=%.3f, %.1fs",
        result.metrics.get("teacher/test/top1", float("nan")),
        k,
        result.metrics.get("teacher/test/topk", float("nan")),
        result.metrics.get("teacher/train_oof/top1", float("nan")),
        result.metrics["teacher/time/total_s"],
    )
    return result
