"""The student stage: align the student on preference rows (or leave it as is), save its adapter.

`student_job(cfg, kind)` unpacks `student.*`, `optim.*`, the task's token budgets and the
Lightning config once; below it nothing reads the config. `fit_student` is one story:
seed, build the student, encode the rows, (DPO) attach reference log-probs, fit, validate,
save. DPO's SFT start is an explicit step before it (`sft_start`): the same job with the
SFT loss, cached, whose adapter the DPO job then starts from (and takes its reference from).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mint.cache import cached
from mint.config import Method, plain
from mint.files import build_atomically, folder_digest
from mint.optim.module import PreferenceModule
from mint.optim.reference import reference_logps
from mint.optim.trunk import TrunkCollator, cached_trunk, with_trunk_rows
from mint.pairs.loaders import make_loaders
from mint.pairs.rows import Rows, pairs_to_texts
from mint.pairs.weights import with_answer_weights
from mint.report import scrub, write_metrics
from mint.resume import LAST, TrainingRecord, start_checkpoint
from mint.stages.trainer import (
    LastValidation,
    build_callbacks,
    build_loggers,
    build_trainer,
    close_loggers,
    gathered_state_dict,
    log_artifact,
    wandb_run_name,
)
from mint.student.kinds import StudentKind, StudentSpec, TextLengths

log = logging.getLogger("mint")
# What DPO's SFT start changes of the optim settings (all else, lr and steps included, is shared).
SFT_START = {"method": str(Method.sft), "rpo_alpha": None, "init_from_sft": False}


@dataclass(frozen=True)
class MethodSettings:
    """`optim.*`: the alignment method and how it is optimised."""

    method: Method
    beta: float  # ORPO lambda / DPO beta
    rpo_alpha: float | None  # DPO: weight of an NLL term on the chosen answer
    init_from_sft: bool  # DPO: start from (and take the reference from) a cached SFT adapter
    sft_on_prompt: bool  # NLL over prompt + chosen (TRL's ORPO) instead of chosen only
    packed: bool  # one [prompt, chosen, rejected] row per pair
    length_grouped: bool  # packed: batches of similar lengths instead of a plain shuffle
    answer_rank_decay: float  # answer tokens weigh k^-p by their item's rank k (mint/pairs/weights.py)
    batch_size: int
    eval_batch_size: int
    warmup_ratio: float
    optimizer: Callable[..., torch.optim.Optimizer] | None  # called with the trainable parameters
    scheduler: Callable[..., Any] | None  # called with the optimizer and warmup/total steps


@dataclass(frozen=True)
class StudentJob:
    """Everything the student stage needs, from the config, typed."""

    kind: StudentKind
    student: StudentSpec
    method: MethodSettings
    lengths: TextLengths
    seed: int
    cache_dir: Path
    ckpt_path: str | None  # the Lightning checkpoint to resume from (mint/resume.py)
    resume: bool  # resume=true: an SFT start cut short in this run's folder continues too
    # Lightning wiring: `_target_` nodes instantiated per fit (conf/trainer, callbacks, logger).
    trainer: DictConfig
    callbacks: DictConfig
    loggers: DictConfig
    hparams: dict[str, Any]  # the run's config as loggers record it, secrets scrubbed
    # What determines a trained adapter besides the rows, as plain data (the SFT start's key).
    identity: dict[str, Any]

    @property
    def starts_from_sft(self) -> bool:
        return (
            self.method.method is Method.dpo
            and self.method.init_from_sft
            and self.student.adapter_path is None
        )

    def as_sft(self) -> StudentJob:
        """The same student and settings with the SFT loss, from scratch: DPO's SFT start."""
        method = dataclasses.replace(self.method, **SFT_START | {"method": Method.sft})
        hparams = {**self.hparams, "optim": {**self.hparams["optim"], **SFT_START}}
        identity = {**self.identity, "optim": {**self.identity["optim"], **SFT_START}}
        return dataclasses.replace(self, method=method, ckpt_path=None, hparams=hparams, identity=identity)

    def starting_from(self, adapter_path: str) -> StudentJob:
        """The same job, its student starting from (and, for DPO, taking its reference from) an adapter."""
        hparams = {**self.hparams, "student": {**self.hparams["student"], "adapter_path": adapter_path}}
        student = dataclasses.replace(self.student, adapter_path=adapter_path)
        return dataclasses.replace(self, student=student, hparams=hparams)


def student_spec(s: DictConfig) -> StudentSpec:
    """`student.*` as the loaders take it, nested nodes instantiated (training here; `mint ask` and
    `mint export` too)."""

    def make(node: Any) -> Any:  # plain lists/dicts, not OmegaConf containers, reach peft/transformers
        return instantiate(node, _convert_="all") if node is not None else None

    return StudentSpec(
        name=s.name,
        name_or_path=s.name_or_path,
        build=make(s.build),
        gguf_file=s.gguf_file,
        dtype=s.dtype,
        quantization=make(s.quantization),
        lora=make(s.lora),
        adapter_path=s.adapter_path,
        gradient_checkpointing=s.gradient_checkpointing,
        trust_remote_code=s.trust_remote_code,
        attn_implementation=s.attn_implementation,
        train_top_layers=s.train_top_layers,
    )


def student_job(cfg: DictConfig, kind: StudentKind) -> StudentJob:
    """Unpack the config once: `student.*` (nested nodes instantiated), `optim.*`, lengths, Lightning."""
    s, o, task = cfg.student, cfg.optim, cfg.task
    student = student_spec(s)
    method = MethodSettings(
        method=Method(o.method),
        beta=o.beta,
        rpo_alpha=o.rpo_alpha,
        init_from_sft=o.init_from_sft,
        sft_on_prompt=o.sft_on_prompt,
        packed=o.packed,
        length_grouped=o.length_grouped,
        answer_rank_decay=o.answer_rank_decay,
        batch_size=o.batch_size,
        eval_batch_size=o.eval_batch_size,
        warmup_ratio=o.warmup_ratio,
        optimizer=instantiate(o.optimizer) if o.optimizer is not None else None,
        scheduler=instantiate(o.scheduler) if o.scheduler is not None else None,
    )
    lengths = TextLengths(
        max_length=task.max_length,
        max_prompt_length=task.get("max_prompt_length"),
        prompt_truncation=str(task.get("prompt_truncation")),
    )
    identity = {
        "student": plain(s),
        # beta is DPO's: a sweep over it shares one SFT start. answer_rank_decay at its default (0) is
        # left out, so that stage caches and checkpoints made before it existed stay valid.
        "optim": {
            k: v for k, v in plain(o).items() if k != "beta" and not (k == "answer_rank_decay" and v == 0)
        },
        "trainer": plain(cfg.trainer),
        "task_lengths": [lengths.max_length, lengths.max_prompt_length, task.get("prompt_truncation")],
        "seed": cfg.seed,
    }
    return StudentJob(
        kind=kind,
        student=student,
        method=method,
        lengths=lengths,
        seed=cfg.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        # ckpt_path=, resume=true (mint/resume.py) or None; untrained methods have nothing to resume
        ckpt_path=start_checkpoint(cfg) if method.method.trains else None,
        resume=bool(cfg.get("resume", False)),
        trainer=cfg.trainer,
        callbacks=cfg.callbacks,
        loggers=cfg.logger,
        hparams=scrub(plain(cfg)),  # resolved, so a ${oc.env:...} secret is scrubbed first (mint/report.py)
        identity=identity,
    )


def check_rows(rows: Rows, *, batch_size: int, objective: str) -> None:
    """Refuse, before training, preference data too small for the run (counts and setting named)."""
    if len(rows.train) < batch_size:
        raise ValueError(
            f"{len(rows.train)} training pairs, fewer than one batch (optim.batch_size={batch_size}): "
            "lower optim.batch_size or add pairs"
        )
    if not rows.val and objective.startswith("val/"):
        raise ValueError(
            f"no validation pairs ({len(rows.train)} training pairs), but objective={objective} is "
            "measured on them: add pairs, raise task.val_fraction, or set objective= to another key"
        )


def base_identity(student: dict[str, Any]) -> dict[str, Any]:
    """What of `student.*` determines the frozen base's hidden states (not the adapter, the learning
    rate or gradient checkpointing: the trunk lies below every trained weight)."""
    ignored = {"lora", "adapter_path", "learning_rate", "gradient_checkpointing", "train_top_layers"}
    return {k: v for k, v in student.items() if k not in ignored}


def rows_digest(rows: list[dict]) -> str:
    """sha256 of preference rows as the student sees them (an image row's pixels included)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps({k: v for k, v in row.items() if k != "images"}, sort_keys=True).encode())
        for image in row.get("images") or []:
            digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()


# Trainer keys that change when or how often things are logged or validated, never the weights.
WEIGHT_NEUTRAL_TRAINER_KEYS = frozenset(
    {
        "accelerator",
        "log_every_n_steps",
        "val_check_interval",
        "check_val_every_n_epoch",
        "limit_val_batches",
        "num_sanity_val_steps",
        "enable_progress_bar",
        "enable_model_summary",
    }
)


def training_record(job: StudentJob, rows: Rows) -> dict[str, Any]:
    """What determines a trained student's weights, as plain data: each checkpoint keeps it, and
    `resume=true` refuses a checkpoint whose record differs (mint/resume.py). JSON types only
    (an enum becomes its value): checkpoints are loaded with weights_only=True."""
    record = {
        "rows": rows_digest(rows.train),
        "val_rows": rows_digest(rows.val),
        **job.identity,
        # beta (left out of the identity for the SFT start's sake) weighs ORPO's and DPO's losses
        "optim": {
            **job.identity["optim"],
            "beta": None if job.method.method is Method.sft else job.method.beta,
        },
        "trainer": {k: v for k, v in job.identity["trainer"].items() if k not in WEIGHT_NEUTRAL_TRAINER_KEYS},
    }
    return json.loads(json.dumps(record, default=str))


def sft_start_key(job: StudentJob, rows: Rows) -> dict[str, Any]:
    """What determines DPO's SFT start: the training record of the same job with the SFT loss."""
    return training_record(job.as_sft(), rows)


def sft_start(job: StudentJob, rows: Rows, run_dir: Path) -> str:
    """The paper's DPO starts from SFT: train the student with the SFT loss on the same prompts
    (chosen as target) and the same settings, once per (rows, student, settings), in the stage
    cache; returns the adapter folder. A sweep over DPO betas reuses it, and so does a DPO run
    after an `optim=sft` run with the same settings (`share_sft_start`)."""
    sft = job.as_sft()
    key = sft_start_key(job, rows)

    def make(folder: Path) -> None:
        log.info("optim.init_from_sft: training the SFT start of %s first", job.method.method)
        # Its checkpoints and logs stay in this run's sft_start/, out of the cache entry and
        # apart from the DPO logs (a CSV logger would otherwise overwrite them).
        out = run_dir / "sft_start"
        last = out / "checkpoints" / LAST
        # A DPO run stopped during its SFT start (kill, preemption): resume=true continues the
        # start from its last checkpoint in this run's folder, as it does the DPO training.
        start = dataclasses.replace(sft, ckpt_path=str(last)) if job.resume and last.is_file() else sft
        if start.ckpt_path:
            log.info("resume=true: the SFT start continues from %s", last)
        loggers = build_loggers(sft.loggers, sft.hparams, save_dir=out, name_suffix="-sft_start")
        try:
            fit_student(start, rows, folder, loggers, checkpoint_dir=out / "checkpoints")
        finally:
            close_loggers(loggers)

    return str(cached(job.cache_dir, "sft_start", key, make) / "adapter")


def share_sft_start(job: StudentJob, rows: Rows, stage_dir: Path) -> None:
    """An `optim=sft` run from scratch has trained exactly the adapter that DPO's SFT start with the
    same settings would (same rows, seed, settings; training is deterministic): put it in the stage
    cache as that start, so a DPO run after it (a comparison runs sft before dpo) starts from it
    instead of training SFT a second time. A no-op when the entry exists already."""
    if job.method.method is not Method.sft or job.student.adapter_path is not None:
        return

    def make(folder: Path) -> None:
        shutil.copytree(stage_dir / "adapter", folder / "adapter")
        shutil.copy2(stage_dir / "metrics.json", folder / "metrics.json")

    cached(job.cache_dir, "sft_start", sft_start_key(job, rows), make)


def fit_student(
    job: StudentJob,
    rows: Rows,
    stage_dir: Path,
    loggers: list,
    checkpoint_dir: Path | None = None,
    validation: Callable[[torch.nn.Module, Any], L.Callback] | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Align the student on `rows` (or leave it as is for optim=none|rag), validate, save its adapter.

    `loggers` stay open (the evaluation that follows logs to them too); `checkpoint_dir`
    replaces the checkpoint callback's folder; `validation(model, processor)` makes one more
    callback for training (the task's metric on the validation split, `task.eval.val_ranking`).
    """
    started = time.time()
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Seeded here, not only at the start of the run: what ran before (the teacher, a W&B logger's
    # start-up) may have drawn from the global generators, and the student's LoRA init and
    # training must not depend on that (same seed, same numbers, whichever logger is on).
    L.seed_everything(job.seed, workers=True, verbose=False)
    kind, settings = job.kind, job.method
    trains = settings.method.trains
    model, processor = kind.load(
        job.student,
        cache_dir=str(job.cache_dir),
        corpus=pairs_to_texts(rows.train),
        with_adapter=trains,  # optim=none|rag measure the untouched base: no adapter at all
    )
    train_pairs, train_report = kind.encode(processor, rows.train, job.lengths)
    val_pairs, val_report = kind.encode(processor, rows.val, job.lengths)
    if settings.answer_rank_decay:  # each answer token's weight in the losses (mint/pairs/weights.py)
        tokenizer, decay = kind.tokenizer(processor), settings.answer_rank_decay
        # train and val together: each token of the vocabulary they use is decoded once
        weighted = with_answer_weights([*train_pairs, *val_pairs], tokenizer, decay)
        train_pairs, val_pairs = weighted[: len(train_pairs)], weighted[len(train_pairs) :]
    collator = kind.collator(processor, settings.packed)
    timings: dict[str, float] = {}  # where the stage's time went: time/student/<part>_s
    if job.student.train_top_layers is not None and trains:
        # The frozen layers run once per row (train and val), here and cached; training runs the top
        # layers only, on those states (mint/optim/trunk.py).
        everything = [*train_pairs, *val_pairs]
        trunk_started = time.time()
        trunk = cached_trunk(
            model,
            everything,
            collator,
            top_layers=job.student.train_top_layers,
            batch_size=settings.eval_batch_size,
            cache_dir=job.cache_dir,
            base=base_identity(job.identity["student"]),
        )
        items = with_trunk_rows(everything)
        train_pairs, val_pairs = items[: len(train_pairs)], items[len(train_pairs) :]
        collator = TrunkCollator(collator, trunk)
        timings["time/student/trunk_s"] = time.time() - trunk_started  # built, or read from the cache
    if settings.method is Method.dpo:
        reference_started = time.time()
        reference = dict(
            batch_size=settings.eval_batch_size,
            forward=kind.sides_forward,
            cache_dir=job.cache_dir,
            student={
                **job.identity["student"],
                "adapter_path": job.student.adapter_path,
                # by content too: an adapter retrained in place gives other reference log-probs
                "adapter_digest": folder_digest(Path(job.student.adapter_path))
                if job.student.adapter_path
                else None,
            },
        )
        train_pairs = reference_logps(model, train_pairs, collator, **reference)
        val_pairs = reference_logps(model, val_pairs, collator, **reference)
        timings["time/student/reference_s"] = time.time() - reference_started

    module = PreferenceModule(
        model,
        method=settings.method,
        beta=settings.beta,
        rpo_alpha=settings.rpo_alpha,
        sft_on_prompt=settings.sft_on_prompt,
        optimizer=settings.optimizer,
        scheduler=settings.scheduler,
        warmup_ratio=settings.warmup_ratio,
        packed=settings.packed,
        forward=kind.sides_forward,
    )
    train_loader, val_loader = make_loaders(
        train_pairs,
        val_pairs,
        collator,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        seed=job.seed,
        length_grouped=settings.packed and settings.length_grouped,
    )
    callbacks = build_callbacks(
        job.callbacks,
        progress_bar=job.trainer.enable_progress_bar,
        training=trains,
        checkpoint_dir=checkpoint_dir,
    )
    if validation is not None and trains:
        callbacks.append(validation(model, processor))
    if trains:
        record = training_record(job, rows)
        callbacks.append(TrainingRecord(record, checkpoint=job.ckpt_path, strict=job.resume))
    last_validation = LastValidation()
    callbacks.append(last_validation)
    trainer = build_trainer(job.trainer, loggers=loggers, callbacks=callbacks, root_dir=stage_dir)
    metrics: dict[str, Any] = {"data/train_pairs": len(train_pairs), "data/val_pairs": len(val_pairs)}
    if train_report is not None:
        metrics["data/dropped_pairs"] = train_report.dropped + (val_report.dropped if val_report else 0)
        metrics["data/truncated_pairs"] = train_report.prompt_truncated + train_report.answer_truncated
    if trains:
        fit_started = time.time()
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=val_loader,
            ckpt_path=job.ckpt_path,
            weights_only=True,  # a checkpoint is data: never run code from its pickle
        )
        metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        metrics["time/student/fit_s"] = time.time() - fit_started  # validation passes included
        metrics["train/steps"] = trainer.global_step
        metrics["train/processes"] = trainer.world_size  # > 1 under DDP/FSDP (each saw its share)
        full_state = gathered_state_dict(trainer)  # all processes take part in the gather
        if trainer.is_global_zero:
            save_adapter(model, processor, stage_dir / "adapter", state_dict=full_state)
            log_adapter_artifact(loggers, job, stage_dir / "adapter", steps=trainer.global_step)
    if val_loader is not None and trains and last_validation.step == trainer.global_step:
        # Fit validated after its last step: the same weights would give the same numbers again
        # (for a SmolLM2 student a second pass costs a minute or more).
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    elif val_loader is not None:
        for result in trainer.validate(module, dataloaders=val_loader, verbose=False):
            metrics.update(result)
    metrics |= timings
    metrics["time/student_s"] = time.time() - started
    if trainer.is_global_zero:
        write_metrics(stage_dir / "metrics.json", metrics)
        log_dataset_artifact(loggers, job, rows)
    return model, processor, metrics


def log_dataset_artifact(loggers: list, job: StudentJob, rows: Rows) -> None:
    """The preference dataset the student learned from, as a W&B `dataset` artifact (named after its
    folder or file: a stage cache entry is named by its key, so runs on one set share its versions)."""
    if rows.source is None:  # a Hub dataset: W&B has no reference to it
        return
    task = job.hparams["task"]["name"]
    log_artifact(
        loggers,
        rows.source,
        name=f"prefs-{task}-{rows.source.stem}",
        kind="dataset",
        metadata={"task": task, "train_pairs": len(rows.train), "val_pairs": len(rows.val)},
        copy=not rows.source.resolve().is_relative_to(job.cache_dir.resolve()),  # cache entries never change
    )


def log_adapter_artifact(loggers: list, job: StudentJob, adapter: Path, *, steps: int) -> None:
    """The trained adapter as a W&B `model` artifact named after the W&B run (adapter-<run name>)."""
    run_name = wandb_run_name(loggers)
    if run_name is None:
        return
    metadata = {
        "task": job.hparams["task"]["name"],
        "method": str(job.method.method),
        "student": job.student.name,
        "base": job.student.name_or_path,
        "steps": steps,
        "seed": job.seed,
    }
    log_artifact(loggers, adapter, name=f"adapter-{run_name}", kind="model", metadata=metadata)


def save_adapter(
    model: torch.nn.Module, processor: Any, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """PEFT-format adapter + tokenizer (or processor), written beside and renamed into place (a rerun
    in the same folder replaces it). `state_dict`: the model's full weights when they are not in
    `model` itself (gathered from FSDP shards)."""

    def make(folder: Path) -> None:
        if state_dict is not None:
            model.save_pretrained(folder, state_dict=state_dict)
        else:
            model.save_pretrained(folder)
        processor.save_pretrained(folder)

    build_atomically(out_dir, make, replace=True)
