"""`mint ask RUN_DIR [INPUT]`: one question to a trained run's student, answered as evaluation answers.

The input is a clinical note for a text student (the argument itself, a file it names, or stdin)
and an image file for an image student. The prompt is the run's template with the input in
place of a test sample's; generation, parsing against the task's label set and the closed-set
ranking of every label are evaluation's own functions (mint/stages/evaluate.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mint.commands.trained import TrainedRun, load_trained, open_run
from mint.config import Modality
from mint.data.task_data import Sample
from mint.eval.generate import generate_answers
from mint.eval.ranking import label_candidates
from mint.prefs.formats import ParsedAnswer
from mint.stages.evaluate import eval_job, label_scores, student_answers
from mint.stages.teacher import load_task


@dataclass(frozen=True)
class Answer:
    raw: str
    parsed: ParsedAnswer | None  # None: the run's task has no label set (task=custom|example)
    ranking: list[tuple[str, float]]  # every label, best first, with its summed log-prob


def read_input(run: TrainedRun, value: str | None) -> Sample:
    """The user's case as a test sample without truth: a note, or an image for an image student."""
    if run.kind.modality is Modality.image:
        if value is None or not _is_file(value):
            raise FileNotFoundError(
                f"the student of {run.run_dir.name} reads images: give an image file (got {value!r})"
            )
        from PIL import Image

        try:
            with Image.open(value) as image:
                pixels = np.array(image.convert("RGB"))  # a writable copy
        except OSError as err:
            raise ValueError(f"{value}: not an image file ({err})") from None
        return Sample(id="ask", label=0, image=pixels)
    if value is None or value == "-":
        if sys.stdin.isatty():
            print("mint ask: type the clinical note, then Ctrl-D", file=sys.stderr)
        text = sys.stdin.read()
    elif _is_file(value):
        text = Path(value).read_text(encoding="utf-8")
    else:
        text = value
    if not text.strip():
        raise ValueError("the note is empty: give it as an argument, a file or on stdin")
    return Sample(id="ask", label=0, text=text.strip())


def _is_file(value: str) -> bool:
    """Whether the argument names a file (a note is usually too long or odd to be a path)."""
    try:
        return "\n" not in value and Path(value).is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


def ask(run_dir: str | Path, value: str | None) -> tuple[TrainedRun, Answer]:
    run = open_run(run_dir)
    sample = read_input(run, value)
    model, processor = load_trained(run)
    if not run.is_pipeline:
        # task=custom|example: no prompt template, answer format or label set in the config.
        prompt = [{"role": "user", "content": sample.text}]
        raw = generate_answers(model, run.kind.tokenizer(processor), [prompt], run.decoding())[0]
        return run, Answer(raw, None, [])
    job = eval_job(run.cfg)
    labels = load_task(run.cfg.task).labels
    prompt = run.kind.prompt(job.template, sample)
    raw = student_answers(job, run.kind, model, processor, [prompt], [sample.image], labels)[0]
    candidates = label_candidates(run.kind.tokenizer(processor), labels, job.answer)
    scores = label_scores(run.kind, model, processor, [prompt], [sample], candidates)[0]
    order = np.argsort(-scores, kind="stable")
    ranking = [(labels[i], float(scores[i])) for i in order]
    return run, Answer(raw, job.answer.parse(raw, labels), ranking)


def render(run: TrainedRun, answer: Answer, top: int | None) -> str:
    """What `mint ask` prints: the raw answer, the parsed list, the ranking of the labels."""
    cfg = run.cfg
    lines = [
        f"run: {run.run_dir} (task={cfg.task.name}, optim={cfg.optim.method}, student={cfg.student.name})"
    ]
    lines += ["", "answer:", *(f"  {line}" for line in answer.raw.splitlines() or [""])]
    if answer.parsed is None:
        lines += ["", f"(task={cfg.task.name} has no label set: no parsed list and no ranking)"]
        return "\n".join(lines)
    parsed = answer.parsed
    lines += [
        "",
        f"parsed ({len(parsed.items)} names; header {'found' if parsed.has_header else 'missing'}):",
    ]
    for rank, (item, label) in enumerate(zip(parsed.items, parsed.matched, strict=True), start=1):
        where = "not in the label set" if label is None else ("" if label == item else f"-> {label}")
        lines.append(f"  {rank:>2}. {item}  {where}".rstrip())
    scores = np.array([s for _, s in answer.ranking])
    share = np.exp(scores - scores.max())
    share /= share.sum()
    shown = answer.ranking[:top] if top else answer.ranking
    lines += [
        "",
        f"ranking of all {len(answer.ranking)} labels (log-prob of the answer naming it first; "
        "share: softmax over the labels):",
        f"  {'rank':>4}  {'log-prob':>9}  {'share':>6}  label",
    ]
    for rank, ((label, score), p) in enumerate(zip(shown, share, strict=False), start=1):
        lines.append(f"  {rank:>4}  {score:>9.3f}  {p:>6.3f}  {label}")
    if len(shown) < len(answer.ranking):
        lines.append(f"  ... {len(answer.ranking) - len(shown)} more (--top 0 shows all)")
    return "\n".join(lines)
