"""`mint export RUN_DIR OUT`: the run's LoRA merged into its base, saved as a plain HF model folder.

OUT holds safetensors weights, the tokenizer (text student) or processor (image student), a
generation config with the run's decoding settings and a model card (README.md); it loads with
`AutoModelForCausalLM` (text) or `AutoModelForImageTextToText` (Mllama) and no MINT code. A
4-bit or 8-bit base is de-quantized before the merge (the weights the adapter was trained on,
in the run's dtype), with a warning: the merged model is larger and is not the quantized one.
OUT is built beside and renamed into place: a failure leaves no half folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData

from mint.commands.trained import TrainedRun, load_trained, open_run
from mint.config import Modality
from mint.eval.generate import DecodingSettings, generation_config
from mint.files import build_atomically
from mint.student.load import attach_adapter

log = logging.getLogger("mint")

# What loads the exported folder, by the student kind's modality.
MODEL_CLASS = {Modality.text: "AutoModelForCausalLM", Modality.image: "AutoModelForImageTextToText"}
PIPELINE_TAG = {Modality.text: "text-generation", Modality.image: "image-text-to-text"}
PAPER = "Wu et al., Multimodal Integrated Knowledge Transfer to Large Language Models through Preference Optimization with Biomedical Applications, arXiv 2505.05736"


def export(run_dir: str | Path, out: str | Path, *, replace: bool = False) -> Path:
    """Merge and save; returns OUT. An existing OUT is refused unless `replace`."""
    run = open_run(run_dir)
    out = Path(out).expanduser().resolve()
    if out.exists() and not replace:
        raise FileExistsError(f"{out} exists: choose another folder or pass --force to replace it")
    merged, processor = merged_student(run)
    tokenizer = run.kind.tokenizer(processor)
    decoding = run.decoding()
    # The merged model's own end ids are read before its generation config is replaced.
    merged.generation_config = generation_config(decoding, merged, tokenizer)

    def make(folder: Path) -> None:
        merged.save_pretrained(folder)  # safetensors
        processor.save_pretrained(folder)
        card = model_card(run, decoding)
        card.save(folder / "README.md")

    build_atomically(out, make, replace=replace)
    log.info("exported %s to %s", run.run_dir, out)
    return out


def merged_student(run: TrainedRun) -> tuple[torch.nn.Module, Any]:
    """The run's student with its LoRA merged into the base weights (no PEFT wrapper left)."""
    if run.spec.quantization is None:
        model, processor = load_trained(run)
    else:
        log.warning(
            "student.quantization is set: the %s base is de-quantized to %s before the LoRA is merged; "
            "the export is a full-precision model (larger than the quantized one, and not quantized again)",
            run.spec.name,
            run.spec.dtype,
        )
        # The same loader without the adapter, de-quantized, then the adapter as the loader attaches it.
        base, processor = load_trained(run, dataclasses.replace(run.spec, adapter_path=None))
        base = base.dequantize()
        dtype = getattr(torch, run.spec.dtype)
        base = base.to(dtype)
        model = attach_adapter(base, None, str(run.adapter)).eval()
    merged = model.merge_and_unload()
    merged.eval()
    return merged, processor


def _metric_rows(results: dict[str, Any]) -> list[str]:
    """Markdown rows: each test/teacher-test metric with its 95% CI when the run has one."""
    rows = []
    for key, value in results.items():
        if (
            "_ci_" in key
            or not key.startswith(("test/", "teacher/test/"))
            or not isinstance(value, int | float)
        ):
            continue
        low, high = results.get(f"{key}_ci_low"), results.get(f"{key}_ci_high")
        ci = (
            f"[{low:.3f}, {high:.3f}]"
            if isinstance(low, int | float) and isinstance(high, int | float)
            else "—"
        )
        if isinstance(value, float) and math.isnan(value):
            continue
        rows.append(f"| `{key}` | {value:.4f} | {ci} |")
    for key in ("val/loss", "val/rewards/accuracies"):
        if isinstance(results.get(key), int | float):
            rows.append(f"| `{key}` | {results[key]:.4f} | — |")
    return rows


def model_card(run: TrainedRun, decoding: DecodingSettings) -> ModelCard:
    cfg, results = run.cfg, run.results()
    modality = run.kind.modality
    method = cfg.optim.method
    base = run.spec.name_or_path if cfg.student.name_or_path is not None else None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG[modality],
        tags=["mint", "preference-optimization", str(method), "lora-merged", "biomedical"],
        base_model=base if base and not Path(base).exists() else None,  # a Hub id only
    )
    teacher = cfg.get("teacher")
    choice = run.choices().get("teacher")
    teacher_line = (
        (f"`teacher={choice}` " if choice else "") + f"(`{teacher.model._target_}`)"
        if teacher
        else "none (task=custom|example: ready preference pairs)"
    )
    source = cfg.task.get("source")
    if source is not None:
        simulated = "simulate" in source._target_
        data_line = f"`{source._target_}`" + (
            " — **simulated** cases (not real patients or slides)" if simulated else ""
        )
    else:
        data_line = f"preference pairs from `{cfg.task.get('prefs_path')}`"
    built = cfg.student.name_or_path is None
    user_input = (
        "an image (and the fixed question below)" if modality is Modality.image else "a clinical note"
    )
    sections = [
        f"# {cfg.run_name}: a MINT student (LoRA merged)",
        "",
        f"A `{cfg.student.name}` student aligned with **{method}** on the preferences of a multimodal teacher "
        f"(MINT: {PAPER}), exported from run folder `{run.run_dir}` by `mint export`. The LoRA adapter is "
        "merged into the base weights: the folder loads with plain `transformers`.",
        "",
        "## Task",
        "",
        f"- task: `{cfg.task.name}`; the student reads {user_input}",
        f"- answer format: `{cfg.task.answer.header}` then {cfg.task.answer.n} numbered names"
        if "answer" in cfg.task
        else "- answer format: as in the preference pairs",
        f"- teacher: {teacher_line}",
        f"- method: `optim={method}` (beta {cfg.optim.beta}), {results.get('train/steps', '?')} training steps, "
        f"seed {cfg.seed}",
        f"- data: {data_line}",
        "",
        "## How it was made",
        "",
        "```bash",
        run.command(),
        "```",
        "",
    ]
    metrics = _metric_rows(results)
    if metrics:
        sections += [
            "## Metrics (the run's held-out split; 95% bootstrap CIs)",
            "",
            "| metric | value | 95% CI |",
            "|---|---|---|",
            *metrics,
            "",
        ]
    if "prompt" in cfg.task:
        user = cfg.task.prompt.user
        sections += [
            "## Prompt",
            "",
            "The student was trained and evaluated on this prompt (`{text}`: the note), through its chat template:",
            "",
            f"- system: {cfg.task.prompt.system}",
            "- user:" if "{text}" in user else "- user (after the image):",
            "",
            "```text",
            user,
            "```",
            "",
        ]
    sections += ["## How to use", "", "```python", *usage(run, decoding), "```", ""]
    sections += [
        "## Intended use and limits",
        "",
        "- Research on knowledge transfer from multimodal teachers to language models. **Not for clinical "
        "use**: its answers are not diagnoses and were not validated on patients.",
        "- It was trained to answer in the format above for the task's label set only; names outside that "
        "set, other questions and other image types are outside what it learned.",
    ]
    if source is not None and "simulate" in source._target_:
        sections.append(
            "- Its training and test data are simulated: its metrics say nothing about real cases."
        )
    if built:
        sections.append(
            "- Its base is a tiny random-init model built by MINT for tests and smoke runs (a tokenizer trained "
            "on the run's prompts): a demonstration of the machinery, not a useful model."
        )
    sections.append(
        "- The teacher's errors are part of what it learned (its `chosen` answers are the teacher's top names)."
    )
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n"
    return ModelCard(content)


def usage(run: TrainedRun, decoding: DecodingSettings) -> list[str]:
    """A short loading example for the card."""
    cls = MODEL_CLASS[run.kind.modality]
    if run.kind.modality is Modality.image:
        return [
            f"from transformers import AutoProcessor, {cls}",
            "from PIL import Image",
            f'model = {cls}.from_pretrained("PATH")',
            'processor = AutoProcessor.from_pretrained("PATH")',
            'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]',
            "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
            'inputs = processor(images=[[Image.open("patch.png").convert("RGB")]], text=[text], return_tensors="pt")',
            "print(processor.decode(model.generate(**inputs)[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))",
        ]
    return [
        f"from transformers import AutoTokenizer, {cls}",
        f'model = {cls}.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": NOTE}]',
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")',
        "print(tokenizer.decode(model.generate(ids)[0, ids.shape[1]:], skip_special_tokens=True))",
    ]
