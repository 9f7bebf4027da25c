"""The MINT stages before and after the student: data -> teacher -> preference pairs, and evaluation.

Each artifact stage goes through the stage cache (mint.cache), keyed by exactly
the config that determines it: the teacher by the data's fingerprint, the
teacher config and the seed; the preference set by the teacher's key and the
prompt/answer/pair settings. A sweep over `optim=` therefore trains one
teacher and builds one preference set, and every method trains on the same pairs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mint.cache import cached, config_key
from mint.config import Loss
from mint.data.task_data import TaskData
from mint.eval.answers import answer_metrics
from mint.eval.generate import DecodingSettings, generate_answers
from mint.eval.ranking import score_candidates, score_candidates_with_image
from mint.prefs.builder import PromptTemplate, build_preference_rows, save_preference_dataset
from mint.prefs.formats import AnswerFormat
from mint.rag import KnowledgeBase, RagSettings, augment_prompts, knowledge_base
from mint.report import write_atomic
from mint.student.vision import encode_vision_pair
from mint.teacher.metrics import bootstrap_ci, topk_hits
from mint.teacher.stage import TeacherResult, run_teacher_stage

log = logging.getLogger("mint")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def is_pipeline_task(task: DictConfig) -> bool:
    return "source" in task


def load_task(cfg: DictConfig) -> TaskData:
    task = instantiate(cfg.task.source, _convert_="all")
    if not isinstance(task, TaskData):
        raise TypeError(
            f"task.source ({cfg.task.source._target_}) returned {type(task).__name__}, not TaskData"
        )
    return task


def answer_format(cfg: DictConfig) -> AnswerFormat:
    return AnswerFormat(header=cfg.task.answer.header, n=cfg.task.answer.n)


def prompt_template(cfg: DictConfig) -> PromptTemplate:
    return PromptTemplate(system=cfg.task.prompt.system, user=cfg.task.prompt.user)


# --- teacher ----------------------------------------------------------------------
def teacher_key_config(cfg: DictConfig, task: TaskData) -> dict[str, Any]:
    return {
        "data": task.fingerprint(),
        "teacher": _plain(cfg.teacher),
        "k": cfg.task.answer.n,
        "seed": cfg.seed,
    }


def teacher_stage(cfg: DictConfig, task: TaskData) -> tuple[TeacherResult, str]:
    """The trained teacher's scores for every split (train: out-of-fold), from the cache when there."""
    key_config = teacher_key_config(cfg, task)

    def make(folder: Path) -> None:
        run_teacher_stage(
            task,
            make_teacher=instantiate(cfg.teacher.model, _convert_="all"),
            trainer_kwargs=_plain(cfg.teacher.trainer),
            batch_size=cfg.teacher.batch_size,
            folds=cfg.teacher.folds,
            k=cfg.task.answer.n,
            out_dir=folder / "teacher",
            seed=cfg.seed,
            patience=cfg.teacher.patience,
            fit_threads=cfg.teacher.fit_threads,
        )

    entry = cached(Path(cfg.paths.cache_dir), "teacher", key_config, make)
    return TeacherResult.load(entry / "teacher"), config_key(key_config)


# --- preference pairs ---------------------------------------------------------------
def prefs_stage(cfg: DictConfig, task: TaskData, teacher: TeacherResult, teacher_key: str) -> Path:
    """`train.jsonl` (out-of-fold teacher rankings) and `val.jsonl`, plus the HF dataset and its card."""
    settings = {
        "layout": 3,  # bump when the entry's files change, so older entries are not read
        "teacher": teacher_key,
        "answer": _plain(cfg.task.answer),
        "prompt": _plain(cfg.task.prompt),
        "prefs": _plain(cfg.task.prefs),
        "student_modality": cfg.task.student_modality,
    }
    if cfg.task.student_modality not in ("text", "image"):
        raise ValueError(f"task.student_modality={cfg.task.student_modality!r}: expected 'text' or 'image'")
    sees_image = cfg.task.student_modality == "image"

    def rows_for(split: str) -> list[dict[str, Any]]:
        split_task = TaskData(
            task.name, task.labels, {**{s: [] for s in task.splits}, "train": task.splits[split]}
        )
        return build_preference_rows(
            split_task,
            teacher.scores[split],
            answer=answer_format(cfg),
            prompt=prompt_template(cfg),
            q=cfg.task.prefs.q,
            negatives=cfg.task.prefs.negatives,
            force_truth=cfg.task.prefs.force_truth,
            student_sees_image=sees_image,
        )

    def make(folder: Path) -> None:
        started = time.perf_counter()
        train_rows, val_rows = rows_for("train"), rows_for("val")
        built = time.perf_counter() - started
        save_preference_dataset(train_rows, folder, config=settings)
        with open(folder / "val.jsonl", "w") as f:
            for row in val_rows:
                f.write(
                    json.dumps({k: v for k, v in row.items() if k != "images"}, ensure_ascii=False) + "\n"
                )
        stats = {
            "prefs/train_pairs": len(train_rows),
            "prefs/val_pairs": len(val_rows),
            "prefs/pairs_per_s": (len(train_rows) + len(val_rows)) / max(built, 1e-9),
            "prefs/total_s": time.perf_counter() - started,
        }
        (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    return cached(Path(cfg.paths.cache_dir), "prefs", settings, make)


# --- evaluation ---------------------------------------------------------------------
def eval_stage(
    cfg: DictConfig,
    task: TaskData,
    teacher: TeacherResult,
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
) -> dict[str, float]:
    """Generate answers for the test split, parse them, score them; write predictions.jsonl.

    With `task.eval.on_val` the validation split is measured the same way first (`val/...`
    metrics, `predictions_val.jsonl`): that is what hyperparameter search may look at; the test
    split must never steer a choice. optim=rag puts passages retrieved from a knowledge base of
    the training side into every prompt before the (untrained) student answers it.
    """
    metrics: dict[str, float] = {}
    rag = None
    if Loss(cfg.optim.loss) is Loss.rag:
        settings = RagSettings.from_config(cfg.optim.rag)
        kb = knowledge_base(task, settings, Path(cfg.paths.cache_dir))
        rag = (kb, settings)
        metrics["rag/kb_passages"] = len(kb.passages)
    for split in ("val", "test") if cfg.task.eval.on_val else ("test",):
        split_metrics, lines = evaluate_split(cfg, task, teacher, model, tokenizer, split, rag)
        metrics |= split_metrics
        name = "predictions.jsonl" if split == "test" else f"predictions_{split}.jsonl"
        write_atomic(out_dir / name, "\n".join(lines) + "\n")
    return metrics


def evaluate_split(
    cfg: DictConfig,
    task: TaskData,
    teacher: TeacherResult,
    model: torch.nn.Module,
    tokenizer: Any,
    split: str,
    rag: tuple[KnowledgeBase, RagSettings] | None,
) -> tuple[dict[str, float], list[str]]:
    """`<split>/...` metrics of the student's answers and the predictions.jsonl lines of `split`."""
    settings = cfg.task.eval
    samples = task.splits[split][: settings.max_samples]
    template, fmt = prompt_template(cfg), answer_format(cfg)
    sees_image = cfg.task.student_modality == "image"
    prompts = [template.messages(s, with_image=sees_image) for s in samples]
    metrics: dict[str, float] = {}
    retrieved: list[list[dict[str, Any]]] | None = None
    if rag is not None:
        kb, rag_settings = rag
        prompts, retrieved = augment_prompts(
            kb, samples, prompts, rag_settings, Path(cfg.paths.cache_dir) / "embeddings"
        )
        metrics[f"rag/{split}/passages_per_prompt"] = float(np.mean([len(r) for r in retrieved]))
        # retrieval quality: a passage about the true label is among the retrieved ones
        truth_retrieved = [
            any(hit["label"] == task.labels[s.label] for hit in hits)
            for s, hits in zip(samples, retrieved, strict=True)
        ]
        metrics[f"rag/{split}/truth_retrieved"] = float(np.mean(truth_retrieved))
    decoding = DecodingSettings(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        batch_size=settings.batch_size,
    )
    images = [s.image for s in samples] if sees_image else None
    answers = generate_answers(model, tokenizer, prompts, decoding, images=images)
    ranked = teacher.ranked_indices(split)[: len(samples)]
    teacher_top = [[task.labels[j] for j in row[: fmt.n]] for row in ranked]
    teacher_bottom = [[task.labels[j] for j in row[-cfg.task.prefs.q :]] for row in ranked]
    answer_scores, records = answer_metrics(
        answers,
        [task.labels[s.label] for s in samples],
        task.labels,
        fmt,
        teacher_top=teacher_top,
        teacher_bottom=teacher_bottom,
        prefix=split,
        n_boot=settings.n_boot,
        seed=cfg.seed,
    )
    metrics |= answer_scores
    # Closed-set ranking on the test split only: on val, generation metrics are what search needs.
    if split == "test":
        metrics |= closed_set_metrics(
            model,
            tokenizer,
            prompts,
            [s.label for s in samples],
            task.labels,
            fmt,
            n_boot=settings.n_boot,
            seed=cfg.seed,
            images=images,
        )
    lines = []
    for i, (sample, record) in enumerate(zip(samples, records, strict=True)):
        extra = {"retrieved": retrieved[i]} if retrieved is not None else {}
        lines.append(json.dumps({"id": sample.id, **record, **extra}, ensure_ascii=False))
    return metrics, lines


@torch.inference_mode()
def closed_set_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict]],
    truths: list[int],
    labels: list[str],
    fmt: AnswerFormat,
    *,
    n_boot: int,
    seed: int,
    prefix: str = "test",
    images: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """`<prefix>/rank_top1`, `<prefix>/rank_topk`: every label ranked by the student's likelihood, no parsing.

    Each candidate is the answer naming that label first (header + "1. 'Label'"); its summed
    log-prob is the probability of opening the list with it. The closing quote ends the name,
    so a name that is the prefix of another ("X syndrome" / "X syndrome, X-linked") is not
    favoured. Text prompts share their KV cache across candidates (mint/eval/ranking.py); with
    `images` (a vision student: `tokenizer` is its processor) each image is encoded once and
    the candidates run as full sequences.
    """
    was_training = model.training
    model.eval()
    text_tokenizer = tokenizer.tokenizer if images is not None else tokenizer
    candidates = [
        text_tokenizer(f"{fmt.header}\n1. {fmt.quote}{label}{fmt.quote}", add_special_tokens=False)[
            "input_ids"
        ]
        for label in labels
    ]
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="ranking labels", unit="sample")):
        if images is not None:
            # The pair's answers are placeholders: only its prompt ids and image tensors are used.
            # No length cap: training's max_length is not a limit for scoring (a RAG prompt is longer).
            pair = encode_vision_pair(tokenizer, images[i], prompt, "-", "-", max_length=sys.maxsize)
            pad = text_tokenizer.pad_token_id
            scores = score_candidates_with_image(model, pair, candidates, pad_token_id=pad)
        else:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            scores = score_candidates(model, tokenizer, prompt_ids, candidates)
        rows.append(scores.summed.float().cpu().numpy())
    model.train(was_training)
    scores, targets = np.stack(rows), np.array(truths)
    metrics: dict[str, float] = {}
    for name, k in (("rank_top1", 1), ("rank_topk", fmt.n)):
        mean, low, high = bootstrap_ci(topk_hits(scores, targets, k), n_boot=n_boot, seed=seed)
        metrics |= {
            f"{prefix}/{name}": mean,
            f"{prefix}/{name}_ci_low": low,
            f"{prefix}/{name}_ci_high": high,
        }
    return metrics
