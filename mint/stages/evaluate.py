"""The evaluation stage: the student answers the held-out cases; answers are parsed and scored.

Two views side by side: generation (what a user of the student sees: `format_valid`, `top1`,
`topk`, the teacher agreement `car`) and closed-set ranking (every label scored by the
student's likelihood, no parsing: `rank_top1`, `rank_topk`). With `task.eval.on_val` the
validation split is answered first (`val/...`, `predictions_val.jsonl`): what a
hyperparameter search may look at; the test split must never steer a choice. optim=rag puts
passages retrieved from a knowledge base of the training side into every prompt first.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mint.config import Method, plain
from mint.data.task_data import Sample, TaskData, spread_indices
from mint.eval.answers import answer_metrics
from mint.eval.generate import GREEDY, DecodingSettings, generate_answers
from mint.eval.ranking import closed_set_metrics, label_candidates
from mint.eval.trunk_ranking import candidate_row, ranking_trunk, trunk_label_scores
from mint.files import write_atomic
from mint.metrics import topk_hits
from mint.plots import hits_at_k, plot_hits_at_k
from mint.prefs.builder import PromptTemplate
from mint.prefs.formats import AnswerFormat
from mint.rag import KnowledgeBase, RagSettings, augment_prompts, knowledge_base
from mint.report import write_metrics
from mint.stages.student import base_identity
from mint.stages.trainer import Table
from mint.student.kinds import StudentKind
from mint.teacher.crossfit import TeacherResult

log = logging.getLogger("mint")
# Prompts a batch when ranking on trunk states: the logits at a row's ~C * name-length scored
# positions are C * tokens * vocabulary floats (30 labels, 8 tokens, 49k words: 47 MB a row).
RANKING_BATCH = 8


@dataclass(frozen=True)
class EvalJob:
    """`task.eval.*` and what else evaluation reads of the config, typed."""

    task_name: str
    method: Method
    template: PromptTemplate
    answer: AnswerFormat
    q: int  # names in a rejected answer: the teacher's bottom-q for the agreement score
    decoding: DecodingSettings
    max_samples: int | None
    on_val: bool
    n_boot: int
    seed: int
    cache_dir: Path
    rag: RagSettings | None
    # student.train_top_layers, and what identifies the frozen base below them: a text student
    # ranks the labels on cached trunk states (mint/eval/trunk_ranking.py)
    top_layers: int | None
    base: dict[str, Any]

    def trunk_keys(self) -> dict[str, Any]:
        """What `trunk_scorer` reads of the job: the top layers, the base below them, the cache."""
        return {"top_layers": self.top_layers, "base": self.base, "cache_dir": self.cache_dir}


def eval_job(cfg: DictConfig) -> EvalJob:
    settings = cfg.task.eval
    method = Method(cfg.optim.method)
    return EvalJob(
        task_name=cfg.task.name,
        method=method,
        template=PromptTemplate(system=cfg.task.prompt.system, user=cfg.task.prompt.user),
        answer=AnswerFormat(header=cfg.task.answer.header, n=cfg.task.answer.n),
        q=cfg.task.prefs.q,
        decoding=DecodingSettings(
            generation=generation_node(cfg),
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            no_repeated_names=settings.no_repeated_names,
            known_names_only=settings.known_names_only,
            seed=cfg.seed,
        ),
        max_samples=settings.max_samples,
        on_val=settings.on_val,
        n_boot=settings.n_boot,
        seed=cfg.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        rag=RagSettings.from_config(cfg.optim.rag) if method is Method.rag else None,
        top_layers=cfg.student.get("train_top_layers"),
        base=base_identity(plain(cfg.student)),
    )


def generation_node(cfg: DictConfig) -> dict[str, Any]:
    """The `generation` node as plain data. A run folder written before the group existed kept its
    decoding in task.eval (do_sample, temperature, top_p, top_k): `mint ask` and `mint export` read
    those."""
    if cfg.get("generation") is not None:
        return plain(cfg.generation)
    old = cfg.task.get("eval", {})
    if not old.get("do_sample", False):
        return dict(GREEDY)
    return {"do_sample": True, **{k: old[k] for k in ("temperature", "top_p", "top_k") if k in old}}


def eval_stage(
    cfg: DictConfig,
    kind: StudentKind,
    task: TaskData,
    teacher: TeacherResult,
    model: torch.nn.Module,
    processor: Any,
    run_dir: Path,
) -> tuple[dict[str, float], list[Path | Table]]:
    """Metrics of the student on the test split (and val with `task.eval.on_val`), written to
    `eval/metrics.json` and `eval/predictions*.jsonl`; for the loggers, the hits@k plot against
    the teacher and a predictions table per split (`test/predictions`, `val/predictions`)."""
    job = eval_job(cfg)
    out_dir = run_dir / "eval"
    metrics: dict[str, float] = {}
    media: list[Path | Table] = []
    rag = None
    if job.rag is not None:
        kb = knowledge_base(task, job.rag, job.cache_dir)
        rag = (kb, job.rag)
        metrics["rag/kb_passages"] = len(kb.passages)
    for split in ("val", "test") if job.on_val else ("test",):
        split_metrics, records = evaluate_split(job, kind, task, teacher, model, processor, split, rag)
        metrics |= split_metrics
        name = "predictions.jsonl" if split == "test" else f"predictions_{split}.jsonl"
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        write_atomic(out_dir / name, "\n".join(lines) + "\n")
        media.append(predictions_table(f"{split}/predictions", records, task.splits[split], kind))
        if split == "test":
            media.append(plot_student_vs_teacher(job, task, teacher, records, run_dir))
    write_metrics(out_dir / "metrics.json", metrics)
    return metrics, media


def predictions_table(
    key: str, records: list[dict[str, Any]], samples: list[Sample], kind: StudentKind
) -> Table:
    """One row per answered case: its id, the truth, the raw answer, the parsed list (one name a
    line), where the truth is in it (1-based, None when absent), the hits at 1 and at k, whether
    the answer is valid, the teacher agreement; and the image, for a student that sees one."""
    has_car = bool(records) and "car" in records[0]
    columns = ["id", "truth", "answer", "parsed", "truth_rank", "top1", "topk", "format_valid"]
    columns += ["car"] * has_car
    by_id = {s.id: s for s in samples}
    images = [kind.shown_image(by_id[r["id"]]) for r in records]
    with_image = any(image is not None for image in images)
    rows = []
    for r, image in zip(records, images, strict=True):
        rank = r["parsed"].index(r["truth"]) + 1 if r["truth"] in r["parsed"] else None
        row = [r["id"], r["truth"], r["answer"], "\n".join(r["parsed"]), rank, r["top1"], r["topk"]]
        rows.append(row + [r["format_valid"]] + [r["car"]] * has_car + [image] * with_image)
    return Table(key, columns + ["image"] * with_image, rows, image_columns=("image",) * with_image)


def evaluate_split(
    job: EvalJob,
    kind: StudentKind,
    task: TaskData,
    teacher: TeacherResult,
    model: torch.nn.Module,
    processor: Any,
    split: str,
    rag: tuple[KnowledgeBase, RagSettings] | None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`<split>/...` metrics of the student's answers and one predictions record per sample."""
    split_samples = task.splits[split]
    indices = spread_indices(len(split_samples), job.max_samples)
    samples = [split_samples[i] for i in indices]
    prompts = [kind.prompt(job.template, s) for s in samples]
    metrics: dict[str, float] = {}
    retrieved: list[list[dict[str, Any]]] | None = None
    if rag is not None:
        kb, rag_settings = rag
        prompts, retrieved = augment_prompts(kb, samples, prompts, rag_settings, job.cache_dir / "embeddings")
        metrics[f"rag/{split}/passages_per_prompt"] = float(np.mean([len(r) for r in retrieved]))
        # retrieval quality: a passage about the true label is among the retrieved ones
        truth_retrieved = [
            any(hit["label"] == task.labels[s.label] for hit in hits)
            for s, hits in zip(samples, retrieved, strict=True)
        ]
        metrics[f"rag/{split}/truth_retrieved"] = float(np.mean(truth_retrieved))
    tokenizer = kind.tokenizer(processor)
    started = time.time()
    answers = student_answers(job, kind, model, processor, prompts, [s.image for s in samples], task.labels)
    metrics[f"time/{split}/generate_s"] = time.time() - started
    ranked = teacher.ranked_indices(split)[indices]
    answer_scores, records = answer_metrics(
        answers,
        [task.labels[s.label] for s in samples],
        task.labels,
        job.answer,
        teacher_top=[[task.labels[j] for j in row[: job.answer.n]] for row in ranked],
        teacher_bottom=[[task.labels[j] for j in row[-job.q :]] for row in ranked],
        prefix=split,
        n_boot=job.n_boot,
        seed=job.seed,
    )
    metrics |= answer_scores
    # Closed-set ranking on the test split only: on val, generation metrics are what search needs.
    if split == "test":
        started = time.time()
        candidates = label_candidates(tokenizer, task.labels, job.answer)
        scores = closed_set_scores(job, kind, model, processor, prompts, samples, candidates)
        metrics["time/test/rank_s"] = time.time() - started  # a ranking trunk's build included
        metrics |= closed_set_metrics(
            scores, [s.label for s in samples], job.answer.n, n_boot=job.n_boot, seed=job.seed
        )
    for i, (sample, record) in enumerate(zip(samples, records, strict=True)):
        extra = {"retrieved": retrieved[i]} if retrieved is not None else {}
        records[i] = {"id": sample.id, **record, **extra}
    return metrics, records


def student_answers(
    job: EvalJob,
    kind: StudentKind,
    model: torch.nn.Module,
    processor: Any,
    prompts: list[list[dict]],
    images: list[np.ndarray | None],
    labels: list[str],
) -> list[str]:
    """The student's answer to each prompt (an image student sees `images[i]` with prompt i), decoded
    as `task.eval` says: what evaluation scores and what `mint ask` prints."""
    return generate_answers(
        model,
        kind.tokenizer(processor),
        prompts,
        job.decoding,
        model_inputs=kind.generation_inputs(processor, images),
        labels=labels,
        quote=job.answer.quote,
    )


@torch.inference_mode()
def label_scores(
    kind: StudentKind,
    model: torch.nn.Module,
    processor: Any,
    prompts: list[list[dict]],
    samples: list[Sample],
    candidates: list[list[int]],
) -> np.ndarray:
    """[prompts, labels]: the summed log-prob of the answer naming each label first."""
    was_training = model.training
    model.eval()
    rows = []
    for prompt, sample in zip(tqdm(prompts, desc="ranking labels", unit="sample"), samples, strict=True):
        scores = kind.label_scores(model, processor, prompt, sample.image, candidates)
        rows.append(scores.float().cpu().numpy())
    model.train(was_training)
    return np.stack(rows)


def closed_set_scores(
    job: EvalJob,
    kind: StudentKind,
    model: torch.nn.Module,
    processor: Any,
    prompts: list[list[dict]],
    samples: list[Sample],
    candidates: list[list[int]],
) -> np.ndarray:
    """[prompts, labels] label scores: on the cached trunk for a student trained on its top layers,
    else at full depth with the KV cache."""
    if job.top_layers is not None:  # the layers below run once per split and base
        images = [s.image for s in samples]
        return trunk_scorer(kind, model, processor, prompts, images, candidates, **job.trunk_keys())(model)
    return label_scores(kind, model, processor, prompts, samples, candidates)


def trunk_scorer(
    kind: StudentKind,
    model: torch.nn.Module,
    processor: Any,
    prompts: list[list[dict]],
    images: list[np.ndarray | None],
    candidates: list[list[int]],
    *,
    top_layers: int,
    cache_dir: Path,
    base: dict[str, Any],
) -> Callable[[torch.nn.Module], np.ndarray]:
    """The label scores of a top-N student (the base's or one trained on it: the function's
    argument) from the trunk states of one packed candidate row per prompt, built from `model`
    once (or read from the cache). `base` identifies the frozen base (its cache key)."""
    tokenizer = kind.tokenizer(processor)
    prompt_ids, row_inputs = kind.ranking_prompts(processor, prompts, images)
    rows = [candidate_row(ids, candidates) for ids in prompt_ids]
    # Rows alike share one trunk sequence: an image task asks every image the same question, and
    # its image enters above the trunk, so one sequence serves the whole split.
    index: dict[tuple[int, ...], int] = {}
    sequences = [index.setdefault(tuple(row.input_ids), len(index)) for row in rows]
    distinct = list({tuple(row.input_ids): row for row in rows}.values())  # in `index`'s order
    trunk = ranking_trunk(
        model,
        distinct,
        top_layers=top_layers,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        batch_size=RANKING_BATCH,
        cache_dir=cache_dir,
        base=base,
    )

    def scores(trained: torch.nn.Module) -> np.ndarray:
        return trunk_label_scores(
            trained, trunk, rows, batch_size=RANKING_BATCH, sequences=sequences, row_inputs=row_inputs
        )

    return scores


# --------------------------------------------------------------------------- during training


class ClosedSetValidation(L.Callback):
    """`val/rank_top1` and `val/rank_topk` after every validation pass (task.eval.val_ranking): the
    task's own metric along the learning curve, beside the preference loss and reward accuracy,
    which can stand still while top-1 moves (and the reverse)."""

    def __init__(self, scores: Callable[[torch.nn.Module], np.ndarray], truths: list[int], k: int):
        self.scores = scores
        self.truths = np.asarray(truths)
        self.k = k

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # The precision's autocast, as in a validation step: under bf16-mixed the weights being
        # trained are float32 and the frozen ones bfloat16.
        with trainer.precision_plugin.forward_context():
            scores = self.scores(pl_module.model)
        hits = {
            name: topk_hits(scores, self.truths, top).mean() for name, top in (("top1", 1), ("topk", self.k))
        }
        pl_module.log_dict({f"val/rank_{name}": float(value) for name, value in hits.items()})


def val_ranking(
    cfg: DictConfig, kind: StudentKind, task: TaskData
) -> Callable[[torch.nn.Module, Any], L.Callback]:
    """For the student stage: a `ClosedSetValidation` over the validation split (its
    `task.eval.max_samples`, spread), made once the student and its processor are loaded."""
    job = eval_job(cfg)
    split = task.splits["val"]
    samples = [split[i] for i in spread_indices(len(split), job.max_samples)]
    prompts = [kind.prompt(job.template, s) for s in samples]

    def make(model: torch.nn.Module, processor: Any) -> L.Callback:
        candidates = label_candidates(kind.tokenizer(processor), task.labels, job.answer)
        if job.top_layers is not None:
            # The trunk is built here, before training, outside its autocast: the states are the
            # base's own, as the test split's are.
            images = [s.image for s in samples]
            scores = trunk_scorer(kind, model, processor, prompts, images, candidates, **job.trunk_keys())
        else:

            def scores(trained: torch.nn.Module) -> np.ndarray:
                return label_scores(kind, trained, processor, prompts, samples, candidates)

        return ClosedSetValidation(scores, [s.label for s in samples], job.answer.n)

    return make


def plot_student_vs_teacher(
    job: EvalJob, task: TaskData, teacher: TeacherResult, records: list[dict[str, Any]], run_dir: Path
) -> Path:
    """`plots/hits_at_k.png`: the student's answers and the teacher's rankings on the same test cases."""
    position = {sample_id: i for i, sample_id in enumerate(teacher.ids["test"])}
    teacher_ranked = [teacher.ranked_labels("test", position[r["id"]]) for r in records]
    truths = [r["truth"] for r in records]
    n = job.answer.n
    curves = {
        f"student ({job.method})": hits_at_k([r["parsed"] for r in records], truths, n),
        "teacher": hits_at_k(teacher_ranked, truths, n),
    }
    path = plot_hits_at_k(
        run_dir / "plots" / "hits_at_k.png",
        curves,
        n_labels=len(task.labels),
        title=f"{job.task_name}: {len(truths)} test cases",
    )
    log.info("plot: %s", path)
    return path
