"""Entry point: `python -m mint.run [overrides]` (Hydra).

Composes the stages. A pipeline task (rare_disease) runs data -> teacher ->
preference pairs (both cached, mint/pipeline.py) -> student -> evaluation on
the test split; `task=custom|example` starts at the student with a ready
preference dataset. `stage=` stops early. The student stage aligns a LoRA
student (orpo | dpo | sft) or leaves it as is (none), measures the held-out
pairs and saves the adapter; every run writes results.json and results.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from mint.cache import cached
from mint.config import Loss, Stage, register_configs
from mint.data import PreferenceCollator, pairs_to_texts, read_preference_rows, tokenize_preference_rows
from mint.data.example_prefs import make_example_prefs, write_jsonl
from mint.leakage import check_pipeline_run, check_task_splits
from mint.optim.module import PreferenceModule
from mint.optim.packing import LengthGroupedSampler, PackedPreferenceCollator, packed_length
from mint.optim.reference import attach_reference_logps
from mint.pipeline import eval_stage, is_pipeline_task, load_task, prefs_stage, prompt_template, teacher_stage
from mint.plots import hits_at_k, plot_hits_at_k
from mint.report import markdown_table, scrub, scrub_job_start, write_metrics, write_results
from mint.resume import start_checkpoint
from mint.student import load_student
from mint.student.vision import VisionPreferenceCollator, encode_vision_pair, load_vision_student

log = logging.getLogger("mint")
register_configs()
# Methods that train nothing: the base student is evaluated (rag changes its prompts only).
UNTRAINED = (Loss.none, Loss.rag)


# --- data -------------------------------------------------------------------------
def load_rows(task: DictConfig) -> list[dict]:
    path = Path(task.prefs_path)
    if task.get("example") is not None and not path.exists():
        log.info("generating the example preference set at %s", path)
        write_jsonl(make_example_prefs(n=task.example.n, seed=task.example.seed), path)
    if not path.exists():
        raise FileNotFoundError(
            f"task.prefs_path={str(path)!r} does not exist: expected a TRL preference dataset "
            "(a .jsonl file or a datasets.save_to_disk folder)"
        )
    rows = read_preference_rows(path, on_error=str(task.on_error))
    if task.max_samples is not None:
        rows = rows[: task.max_samples]
    return rows


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last `val_fraction` of it held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"task.val_fraction={val_fraction}: expected 0 <= value < 1")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * val_fraction)
    if val_fraction > 0 and len(rows) >= 2:
        n_val = max(n_val, 1)
    if len(rows) - n_val < 1:
        raise ValueError(
            f"{len(rows)} preference rows leave none to train on (task.val_fraction={val_fraction})"
        )
    train = [rows[i] for i in order[: len(rows) - n_val]]
    val = [rows[i] for i in order[len(rows) - n_val :]]
    return train, val


# --- student ----------------------------------------------------------------------
def check_student_fits_task(cfg: DictConfig) -> None:
    """Fail before any work when the student cannot read what the task gives it."""
    s = cfg.student
    if s.modality not in ("text", "vision"):
        raise ValueError(f"student.modality={s.modality!r}: expected 'text' or 'vision'")
    wants_image = cfg.task.get("student_modality", "text") == "image"
    if wants_image != (s.modality == "vision"):
        raise ValueError(
            f"task={cfg.task.name} gives the student {'images' if wants_image else 'text'}, but "
            f"student={s.name} is a {s.modality} model; pick a matching student (e.g. "
            f"{'student=tiny_mllama' if wants_image else 'student=tiny_llama'})"
        )


def build_student(cfg: DictConfig, corpus: list[str]) -> tuple[torch.nn.Module, Any]:
    """Explicit wiring of `student.*` into load_student (or load_vision_student); nested
    `_target_` nodes are instantiated. Returns (model, tokenizer or processor)."""
    s = cfg.student

    def make(node: Any) -> Any:  # plain lists/dicts, not OmegaConf containers, reach peft/transformers
        return instantiate(node, _convert_="all") if node is not None else None

    check_student_fits_task(cfg)
    if s.modality == "vision":
        if s.gguf_file is not None:
            raise ValueError("student.gguf_file: GGUF loading is for text students only")
        load, extra = load_vision_student, {}
    else:
        load, extra = load_student, {"gguf_file": s.gguf_file}
    return load(
        s.name_or_path,
        cache_dir=cfg.paths.cache_dir,
        build=make(s.build),
        corpus=corpus,
        **extra,
        dtype=s.dtype,
        quantization=make(s.quantization),
        # optim=none|rag measure the untouched base: no adapter at all
        lora=make(s.lora) if cfg.optim.loss not in UNTRAINED else None,
        adapter_path=s.adapter_path,
        gradient_checkpointing=s.gradient_checkpointing,
        trust_remote_code=s.trust_remote_code,
        attn_implementation=s.attn_implementation,
    )


def reference_logps(cfg: DictConfig, model: torch.nn.Module, pairs: list, collator: Any) -> list[dict]:
    """DPO's reference log-probs, computed once per (pairs, student) and kept in the stage cache.

    The reference is the student as it starts, so the key is the tokenized pairs plus the whole
    student config (base, adapter, dtype, quantization) and the forward layout; a sweep over
    seeds or betas on the same preference set reuses them.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
        if hasattr(pair, "pixel_values"):  # a vision pair: the image is part of what is scored
            digest.update(pair.pixel_values.float().numpy().tobytes())
    key = {
        "pairs": digest.hexdigest(),
        "student": OmegaConf.to_container(cfg.student, resolve=True),
        "packed": cfg.optim.packed,
    }

    def make(folder: Path) -> None:
        scored = attach_reference_logps(model, pairs, collator, cfg.optim.eval_batch_size)
        np.save(
            folder / "ref_logps.npy",
            np.array([[d["ref_chosen_logps"], d["ref_rejected_logps"]] for d in scored]),
        )

    entry = cached(Path(cfg.paths.cache_dir), "reference", key, make)
    ref = np.load(entry / "ref_logps.npy")
    return [
        # shallow field copies: a vision pair's pixel tensors are shared, not duplicated
        {
            **{f.name: getattr(pair, f.name) for f in dataclasses.fields(pair)},
            "ref_chosen_logps": float(c),
            "ref_rejected_logps": float(r),
        }
        for pair, (c, r) in zip(pairs, ref, strict=True)
    ]


def make_loaders(
    train: list,
    val: list,
    collator: PreferenceCollator | PackedPreferenceCollator,
    optim: DictConfig,
    seed: int,
    length_grouped: bool = False,
):
    # StatefulDataLoader saves its position and shuffling state in Lightning's
    # checkpoints, so a run resumed mid-epoch sees exactly the batches it would have.
    if length_grouped:  # similar lengths in a batch: less padding (the sampler is stateful too)
        sampler = LengthGroupedSampler([packed_length(p) for p in train], optim.batch_size, seed=seed)
        train_loader = StatefulDataLoader(
            train, batch_size=optim.batch_size, sampler=sampler, collate_fn=collator
        )
    else:
        generator = torch.Generator().manual_seed(seed)
        train_loader = StatefulDataLoader(
            train, batch_size=optim.batch_size, shuffle=True, collate_fn=collator, generator=generator
        )
    val_loader = (
        DataLoader(val, batch_size=optim.eval_batch_size, shuffle=False, collate_fn=collator) if val else None
    )
    return train_loader, val_loader


def build_callbacks(cfg: DictConfig, training: bool) -> list[L.Callback]:
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    # Lightning refuses a progress-bar callback when the bar is switched off.
    if not cfg.trainer.enable_progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not training:  # nothing to checkpoint
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    return callbacks


def close_loggers(loggers: list) -> None:
    # A Hydra sweep runs its jobs in one process: an open W&B run would swallow the next job's metrics.
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()


def log_final(loggers: list, results: dict[str, Any], plots: list[Path], step: int) -> None:
    """The run's final numbers (teacher, preference set, evaluation) and plots, to every logger."""
    numbers = {
        k: float(v) for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for lg in loggers:
        lg.log_metrics(numbers, step=step)
        if isinstance(lg, WandbLogger):
            for path in plots:
                lg.log_image(key=f"plots/{path.stem}", images=[str(path)], step=step)
        lg.save()


def build_loggers(cfg: DictConfig) -> list:
    loggers = [instantiate(node) for node in cfg.logger.values() if node is not None and "_target_" in node]
    # Resolved, so a ${oc.env:...} secret would be written out: scrubbed first (mint/report.py).
    config = scrub(OmegaConf.to_container(cfg, resolve=True))
    for lg in loggers:
        lg.log_hyperparams(config)
    return loggers


def is_global_zero() -> bool:
    """False in the extra processes of a multi-process run: Lightning's DDP launcher re-runs this
    command with LOCAL_RANK set (torchrun and SLURM set RANK / SLURM_PROCID). Only rank 0 writes
    the run's files."""
    return rank_zero_only.rank == 0


def refuse_lightning_launch_in_a_sweep(trainer: L.Trainer) -> None:
    """Lightning's DDP launcher starts the extra processes by re-running this command: inside a
    local multirun (-m) each of them would re-run the whole sweep. SLURM (hydra/launcher=slurm)
    or torchrun start one process per device themselves, which is fine."""
    if trainer.world_size <= 1 or trainer.strategy.cluster_environment.creates_processes_externally:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            f"trainer.devices={trainer.num_devices} inside a local multirun (-m): Lightning would start "
            "the extra processes by re-running the whole sweep. Run the jobs one by one without -m, "
            "or launch them with hydra/launcher=slurm (SLURM starts one process per device)"
        )


def gathered_state_dict(trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
    """Under FSDP each process holds a shard of every weight: gather the full state dict (on rank 0,
    keys as in the PEFT model). Every process must call this. None for other strategies."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    full = trainer.strategy.lightning_module_state_dict()  # keys "model.<peft key>"
    return {k.removeprefix("model."): v for k, v in full.items()}


def save_adapter(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """PEFT-format adapter + tokenizer, written beside and renamed into place. `state_dict`: the
    model's full weights when they are not in `model` itself (gathered from FSDP shards)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:
        model.save_pretrained(tmp, state_dict=state_dict)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def rows_digest(rows: list[dict]) -> str:
    """sha256 of preference rows as the student sees them (an image row's pixels included)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps({k: v for k, v in row.items() if k != "images"}, sort_keys=True).encode())
        for image in row.get("images") or []:
            digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()


def sft_start_adapter(cfg: DictConfig, train_rows: list[dict], val_rows: list[dict]) -> str:
    """The paper's DPO starts from SFT: train the student with the SFT loss on the same prompts
    (chosen as target) and the same optimisation settings, once per (rows, student, settings),
    in the stage cache; returns the adapter folder. A sweep over DPO betas reuses it."""
    sft_cfg = copy.deepcopy(cfg)
    with open_dict(sft_cfg):
        sft_cfg.optim.name = "sft"
        sft_cfg.optim.loss = str(Loss.sft)
        sft_cfg.optim.rpo_alpha = None
        sft_cfg.optim.init_from_sft = False
        sft_cfg.ckpt_path = None
        sft_cfg.resume = False
    key = {
        "rows": rows_digest(train_rows),
        "val_rows": rows_digest(val_rows),
        "student": OmegaConf.to_container(sft_cfg.student, resolve=True),
        # beta is DPO's: a sweep over it shares one SFT start
        "optim": {
            k: v for k, v in OmegaConf.to_container(sft_cfg.optim, resolve=True).items() if k != "beta"
        },
        "trainer": OmegaConf.to_container(sft_cfg.trainer, resolve=True),
        "task_lengths": [
            cfg.task.max_length,
            cfg.task.get("max_prompt_length"),
            cfg.task.get("prompt_truncation"),
        ],
        "seed": cfg.seed,
    }

    def make(folder: Path) -> None:
        log.info("optim.init_from_sft: training the SFT start of %s first", cfg.optim.name)
        # Its checkpoints and logs stay in this run's sft_start/, out of the cache entry and
        # apart from the DPO logs (a CSV logger would otherwise overwrite them).
        out = Path(cfg.paths.output_dir) / "sft_start"
        with open_dict(sft_cfg):
            sft_cfg.run_name = f"{cfg.run_name}-sft_start"
            if sft_cfg.callbacks.get("model_checkpoint") is not None:
                sft_cfg.callbacks.model_checkpoint.dirpath = str(out / "checkpoints")
            for node in sft_cfg.logger.values():
                if node is not None and "save_dir" in node:
                    node.save_dir = str(out)
        student_stage(sft_cfg, train_rows, val_rows, folder)

    return str(cached(Path(cfg.paths.cache_dir), "sft_start", key, make) / "adapter")


def starting_from(cfg: DictConfig, adapter_path: str) -> DictConfig:
    """A copy of `cfg` whose student starts from (and, for DPO, takes its reference from) the adapter."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.student.adapter_path = adapter_path
    return cfg


# --- the run ----------------------------------------------------------------------
def student_stage(
    cfg: DictConfig,
    train_rows: list[dict],
    val_rows: list[dict],
    stage_dir: Path,
    loggers: list | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Align the student on preference rows (or leave it as is for optim=none); save its adapter.

    `loggers`: the run's loggers, kept open for the evaluation that follows (the caller closes
    them); None builds this stage's own and closes them at its end.
    """
    started = time.time()
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Seeded here, not only at the start of the run: what ran before (the teacher, a W&B logger's
    # start-up) may have drawn from the global generators, and the student's LoRA init and
    # training must not depend on that (same seed, same numbers, whichever logger is on).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer = build_student(cfg, corpus=pairs_to_texts(train_rows))

    vision = cfg.student.modality == "vision"
    if vision:
        # Rows carry their image (attached by sample id); the processor renders the chat
        # template with the image token and preprocesses the pixels.
        def encode(rows: list[dict]) -> list:
            return [
                encode_vision_pair(
                    tokenizer,
                    row["images"][0],
                    row["prompt"],
                    row["chosen"],
                    row["rejected"],
                    cfg.task.max_length,
                )
                for row in rows
            ]

        train_pairs, val_pairs = encode(train_rows), encode(val_rows)
        train_report = val_report = None
        packed = False  # the packed layout does not carry cross-attention inputs yet
        collator = VisionPreferenceCollator(tokenizer.tokenizer.pad_token_id)
    else:
        tokenize = dict(
            max_length=cfg.task.max_length,
            max_prompt_length=cfg.task.max_prompt_length,
            prompt_truncation=str(cfg.task.prompt_truncation),
        )
        train_pairs, train_report = tokenize_preference_rows(train_rows, tokenizer, **tokenize)
        val_pairs, val_report = (
            tokenize_preference_rows(val_rows, tokenizer, **tokenize) if val_rows else ([], None)
        )
        # Packed rows [prompt, chosen, rejected] encode each prompt once (mint/optim/packing.py).
        packed = cfg.optim.packed
        collator = (
            PackedPreferenceCollator(tokenizer.pad_token_id)
            if packed
            else PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
        )
    loss = Loss(cfg.optim.loss)
    if loss is Loss.dpo:
        train_pairs = reference_logps(cfg, model, train_pairs, collator)
        val_pairs = reference_logps(cfg, model, val_pairs, collator) if val_pairs else []

    module = PreferenceModule(
        model,
        loss=loss,
        beta=cfg.optim.beta,
        rpo_alpha=cfg.optim.rpo_alpha,
        sft_on_prompt=cfg.optim.sft_on_prompt,
        optimizer=instantiate(cfg.optim.optimizer) if cfg.optim.optimizer is not None else None,
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.scheduler is not None else None,
        warmup_ratio=cfg.optim.warmup_ratio,
        packed=packed,
    )
    train_loader, val_loader = make_loaders(
        train_pairs, val_pairs, collator, cfg.optim, cfg.seed, length_grouped=packed
    )
    callbacks = build_callbacks(cfg, training=loss not in UNTRAINED)
    own_loggers = loggers is None
    loggers = build_loggers(cfg) if own_loggers else loggers
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(stage_dir)
    )
    refuse_lightning_launch_in_a_sweep(trainer)
    metrics: dict[str, Any] = {"data/train_pairs": len(train_pairs), "data/val_pairs": len(val_pairs)}
    if train_report is not None:
        metrics["data/dropped_pairs"] = train_report.dropped + (val_report.dropped if val_report else 0)
        metrics["data/truncated_pairs"] = train_report.prompt_truncated + train_report.answer_truncated
    try:
        if loss not in UNTRAINED:
            trainer.fit(
                module,
                train_dataloaders=train_loader,
                val_dataloaders=val_loader,
                ckpt_path=start_checkpoint(cfg),  # ckpt_path=, resume=true (mint/resume.py) or None
                weights_only=True,  # a checkpoint is data: never run code from its pickle
            )
            metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
            metrics["train/steps"] = trainer.global_step
            metrics["train/processes"] = trainer.world_size  # > 1 under DDP/FSDP (each saw its share)
            full_state = gathered_state_dict(trainer)  # all processes take part in the gather
            if trainer.is_global_zero:
                save_adapter(model, tokenizer, stage_dir / "adapter", state_dict=full_state)
        if val_loader is not None:
            for result in trainer.validate(module, dataloaders=val_loader, verbose=False):
                metrics.update(result)
    finally:
        if own_loggers:
            close_loggers(loggers)
    metrics["time/student_s"] = time.time() - started
    if trainer.is_global_zero:
        write_metrics(stage_dir / "metrics.json", metrics)
    return model, tokenizer, metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the configured stages and returns the flat results dict (also in results.json)."""
    check_student_fits_task(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    stage = Stage(cfg.stage)
    results: dict[str, Any] = {}
    pipeline = is_pipeline_task(cfg.task)
    if Loss(cfg.optim.loss) is Loss.rag and not pipeline:
        raise ValueError(
            f"optim=rag needs a pipeline task (task=rare_disease|tissue): its knowledge base is built "
            f"from the task's training data, and task={cfg.task.name} has only preference pairs"
        )
    if pipeline:
        if cfg.teacher is None:
            raise ValueError(
                f"task={cfg.task.name} needs a teacher: add teacher=fusion|clip|plip "
                f"(or conf/teacher/task_{cfg.task.name}.yaml naming its usual one)"
            )
        task = load_task(cfg)
        check_task_splits(task, cfg.task.student_modality)  # no held-out input under a train id
        teacher, teacher_key = teacher_stage(cfg, task)
        results.update(teacher.metrics)
        if is_global_zero():
            write_metrics(run_dir / "teacher" / "metrics.json", teacher.metrics)
        if stage is not Stage.teacher:
            prefs_dir = prefs_stage(cfg, task, teacher, teacher_key)
            log.info("preference dataset: %s", prefs_dir)
            results.update(json.loads((prefs_dir / "stats.json").read_text()))
            train_rows = read_preference_rows(prefs_dir / "prefs.jsonl")[: cfg.task.max_samples]
            val_rows = read_preference_rows(prefs_dir / "val.jsonl")
            check_pipeline_run(  # nothing held out reached the teacher's folds or the student's rows
                task,
                teacher_train_ids=teacher.ids["train"],
                train_rows=train_rows,
                val_rows=val_rows,
                prompt=prompt_template(cfg) if cfg.task.student_modality == "text" else None,
            )
            if cfg.task.student_modality == "image":  # JSONL holds no pixels: images come by sample id
                images = {s.id: s.image for split in ("train", "val") for s in task.splits[split]}
                for row in train_rows + val_rows:
                    row["images"] = [images[row["id"]]]
    elif stage in (Stage.teacher, Stage.prefs):
        raise ValueError(
            f"stage={stage} needs a pipeline task (e.g. task=rare_disease); task={cfg.task.name} starts at the student"
        )
    else:
        train_rows, val_rows = split_rows(load_rows(cfg.task), cfg.task.val_fraction, cfg.seed)

    if stage in (Stage.all, Stage.student):
        if cfg.optim.init_from_sft and cfg.student.adapter_path is None:
            cfg = starting_from(cfg, sft_start_adapter(cfg, train_rows, val_rows))
            results["sft_start/adapter"] = cfg.student.adapter_path
        loggers = build_loggers(cfg)  # open until the evaluation is logged too
        try:
            model, tokenizer, student_metrics = student_stage(
                cfg, train_rows, val_rows, run_dir / "student", loggers=loggers
            )
            results.update(student_metrics)
            if not is_global_zero():
                # An extra DDP process: its share of training is done; rank 0 evaluates and writes.
                return results
            plots = []
            if pipeline and stage is Stage.all:
                eval_metrics = eval_stage(cfg, task, teacher, model, tokenizer, run_dir / "eval")
                write_metrics(run_dir / "eval" / "metrics.json", eval_metrics)
                results.update(eval_metrics)
                plots.append(plot_student_vs_teacher(cfg, task, teacher, run_dir))
            log_final(loggers, results, plots, step=int(results.get("train/steps", 0)))
        finally:
            close_loggers(loggers)

    flat = write_results(run_dir, results, title=f"MINT run {cfg.run_name}")
    log.info("results in %s\n%s", run_dir, markdown_table(headline(flat)))
    return flat


def plot_student_vs_teacher(cfg: DictConfig, task: Any, teacher: Any, run_dir: Path) -> Path:
    """`plots/hits_at_k.png`: the student's answers and the teacher's rankings on the same test cases."""
    lines = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines if line]
    position = {sample_id: i for i, sample_id in enumerate(teacher.ids["test"])}
    teacher_ranked = [teacher.ranked_labels("test", position[p["id"]]) for p in predictions]
    truths = [p["truth"] for p in predictions]
    n = cfg.task.answer.n
    curves = {
        f"student ({cfg.optim.name})": hits_at_k([p["parsed"] for p in predictions], truths, n),
        "teacher": hits_at_k(teacher_ranked, truths, n),
    }
    path = plot_hits_at_k(
        run_dir / "plots" / "hits_at_k.png",
        curves,
        n_labels=len(task.labels),
        title=f"{cfg.task.name}: {len(truths)} test cases",
    )
    log.info("plot: %s", path)
    return path


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """What the end of a run prints: the task metrics without CI bounds and timings (all are in results.md)."""
    keys = [k for k in results if k.startswith(("test/", "teacher/test/", "val/")) and "_ci_" not in k]
    val_keys = ("val/loss", "val/rewards/accuracies", "val/top1", "val/topk", "val/format_valid")
    keys = [k for k in keys if not k.startswith("val/") or k in val_keys]
    return {k: results[k] for k in keys} or results


# Generation metrics on the validation split: measured only with task.eval.on_val=true.
VAL_GENERATION_METRICS = ("val/top1", "val/topk", "val/format_valid", "val/car")


def check_objective_will_exist(cfg: DictConfig) -> None:
    if cfg.objective in VAL_GENERATION_METRICS and not cfg.task.get("eval", {}).get("on_val", False):
        raise ValueError(
            f"objective={cfg.objective} is measured only with task.eval.on_val=true "
            "(the validation split answered and scored); add it, or pick another objective"
        )


def objective_value(results: dict[str, Any], objective: str, stage: Stage) -> float | None:
    """The metric named by `objective` (what a Hydra sweeper such as Optuna optimises)."""
    if objective in results:
        return float(results[objective])
    if stage in (Stage.teacher, Stage.prefs):
        return None  # stopped before the student: none of its metrics to report
    raise KeyError(
        f"objective={objective!r} is not among this run's results; set objective= to one of: "
        f"{sorted(k for k in results if isinstance(results[k], int | float))}"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Hydra has written .hydra/ already: a secret typed on the command line must not stay there.
    scrub_job_start(Path(cfg.paths.output_dir))
    check_objective_will_exist(cfg)  # before hours of training, not after
    results = run(cfg)
    if not is_global_zero():
        return None  # an extra DDP process: rank 0 reports
    # Hydra sweepers (e.g. hparams_search=orpo_optuna) optimise what main returns.
    return objective_value(results, cfg.objective, Stage(cfg.stage))


if __name__ == "__main__":
    main()
