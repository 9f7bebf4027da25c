"""What the rare-disease student learns from each answer target: one name, or the teacher's list.

The tiny text student sits at 0.3 top-1 after SFT or ORPO on the teacher's 10-name lists, while a
linear read-out of the note's words reaches 0.67 from the truth (experiments/probe_transfer.py).
This asks whether the student's architecture or its training target is the limit. The same
student base the run builds (its tokenizer and random weights, from the stage cache) is trained
in full with a plain language-model loss on the answer only, 600 steps of 8 notes (the student's
budget; AdamW, cosine after a 30-step warm-up), on one of these answers to each training note:

- `truth`: the header and the true name alone ("POTENTIAL_DISEASES:\\n1. 'Name'");
- `teacher1`: the header and the teacher's first name alone;
- `list`: the pairs' `chosen` answer, the teacher's whole list of 10;
- `list_w1`, `list_w2`: the same list, each token's loss weighted 1/k or 1/k^2 by the rank k of
  the item it belongs to (the header counts as item 1).

Each is scored on the test split by closed-set ranking: every label as the first item after the
header, by its summed log-probability; top-1 against the truth.

    PYTHONPATH=. .venv/bin/python experiments/probe_answer_targets.py task=rare_disease --seeds 1

The teacher and the preference set come from the stage cache (`--cache-dir`) when a run made them,
else they are trained first (minutes).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch.nn.utils.rnn import pad_sequence

from mint.cli import compose_config
from mint.pairs.rows import pairs_to_texts
from mint.prefs.builder import PromptTemplate
from mint.stages.prefs import prefs_stage
from mint.stages.student import student_job
from mint.stages.teacher import load_task, teacher_stage
from mint.student.kinds import student_kind

TARGETS = ("truth", "teacher1", "list", "list_w1", "list_w2")


def answer_with_weights(tokenizer, answer: str, power: float) -> tuple[list[int], list[float]]:
    """The answer's token ids (then EOS) and each token's weight k^-power, k its item's rank (every
    token of the item's line: `optim.answer_rank_decay` weighs the names only, mint/pairs/weights.py)."""
    encoded = tokenizer(answer + tokenizer.eos_token, return_offsets_mapping=True)
    items = [max(answer[:start].count("\n"), 1) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], [k**-power for k in items]


def pad(seqs: list[list[int]]) -> torch.Tensor:
    return pad_sequence([torch.tensor(seq) for seq in seqs], batch_first=True)


def train_and_score(
    model, tokenizer, train, test, header: str, labels: list[str], steps: int, lr: float, seed: int
):
    """Full fine-tuning on (prompt ids, answer ids, weights) rows; test top-1 by closed-set ranking."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for _ in range(steps):
        batch = rng.sample(train, 8)
        ids = pad([p + a for p, a, _ in batch])
        mask = pad([[1] * (len(p) + len(a)) for p, a, _ in batch])
        weights = torch.zeros(ids.shape)
        for i, (p, _, w) in enumerate(batch):
            weights[i, len(p) : len(p) + len(w)] = torch.tensor(w)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    names = [tokenizer(f"{name}'")["input_ids"] for name in labels]
    hits = []
    with torch.inference_mode():
        for prompt, label in test:
            prompt = prompt + tokenizer(header)["input_ids"]
            ids = pad([prompt + name for name in names])
            mask = pad([[1] * (len(prompt) + len(name)) for name in names])
            logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
            scores = [
                logp[i, len(prompt) - 1 + torch.arange(len(name)), torch.tensor(name)].sum().item()
                for i, name in enumerate(names)
            ]
            hits.append(int(np.argmax(scores)) == label)
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="+", help="Hydra overrides, task=rare_disease first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = str(Path(args.cache_dir).resolve())
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        cfg = compose_config([*args.overrides, f"seed={seed}"])
        if cfg.task.student_modality != "text":
            raise SystemExit(f"task={cfg.task.name}: expected a task whose student reads text")
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(cache_dir).parent / "probes" / "answer_targets")
            cfg.paths.cache_dir = cache_dir
        task = load_task(cfg.task)
        teacher, key = teacher_stage(cfg, task)
        kind = student_kind(cfg)
        rows, _ = prefs_stage(cfg, kind, task, teacher, key)
        job = student_job(cfg, kind)
        header = f"{cfg.task.answer.header}\n1. '"
        template = PromptTemplate(system=cfg.task.prompt.system, user=cfg.task.prompt.user)
        first_name = dict(zip(teacher.ids["train"], teacher.scores["train"].argmax(1), strict=True))
        truth = {s.id: s.label for s in task.splits["train"]}
        corpus = pairs_to_texts(rows.train)
        _, tokenizer = kind.load(job.student, cache_dir=cache_dir, corpus=corpus, with_adapter=False)

        def prompt_ids(messages, tokenizer=tokenizer) -> list[int]:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tokenizer(text)["input_ids"]

        # Prompts tokenized once; each target trains a fresh copy of the same base.
        prompts = [prompt_ids(row["prompt"]) for row in rows.train]
        test = [(prompt_ids(template.text_messages(s)), s.label) for s in task.splits["test"]]
        for target in args.targets:
            started = time.time()
            model, _ = kind.load(job.student, cache_dir=cache_dir, corpus=corpus, with_adapter=False)
            train = []
            for prompt, row in zip(prompts, rows.train, strict=True):
                answer = row["chosen"][0]["content"]
                if target in ("truth", "teacher1"):
                    label = truth[row["id"]] if target == "truth" else int(first_name[row["id"]])
                    answer = f"{cfg.task.answer.header}\n1. '{task.labels[label]}'"
                power = {"list_w1": 1.0, "list_w2": 2.0}.get(target, 0.0)
                train.append((prompt, *answer_with_weights(tokenizer, answer, power)))
            top1 = train_and_score(
                model, tokenizer, train, test, header, task.labels, args.steps, args.lr, seed
            )
            results.setdefault(target, []).append(top1)
            print(f"seed {seed}: {target}: test top-1 {top1:.3f} ({time.time() - started:.0f} s)", flush=True)
    print(f"\nmeans over seeds {args.seeds} (chance {1 / len(task.labels):.3f})")
    for target, values in results.items():
        print(f"{target}: {np.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
