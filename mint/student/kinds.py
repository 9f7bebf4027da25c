"""The one place that decides text or image: a student *kind*, chosen once per run.

A text student (a causal LM) reads the note; an image student (Llama-3.2-Vision style) reads
the image. Everything that differs between them is a method of its kind, side by side as TRL
keeps its text and vision collators: how the student is loaded, what its prompt holds, how
preference rows become pairs and batches, the unpacked forward the preference module calls,
how candidate answers are scored, and what generation feeds the model. The stages ask the
kind; nothing else in `mint/` branches on the modality.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mint.config import Modality
from mint.data.task_data import Sample, TaskData
from mint.eval.ranking import score_candidates
from mint.eval.trunk_ranking import RowInputs
from mint.leakage import normalise_text
from mint.optim.forward import SidesForward, text_sides_logits
from mint.pairs.packed import PackedPreferenceCollator
from mint.pairs.text import PreferenceCollator, TruncationReport, tokenize_preference_rows
from mint.pairs.vision import PackedVisionCollator, VisionPreferenceCollator, encode_vision_pair
from mint.prefs.builder import PromptTemplate
from mint.student.load import load_student
from mint.student.vision import (
    image_prompt_inputs,
    image_row_inputs,
    image_sides_logits,
    load_vision_student,
)

# Spellings an earlier version accepted, and the word to use now.
RENAMED = {"vision": Modality.image}


@dataclass(frozen=True)
class StudentSpec:
    """How to build or load the student: `student.*` with its nested nodes instantiated."""

    name: str
    name_or_path: str | None
    build: Callable[..., Path] | None
    gguf_file: str | None
    dtype: str
    quantization: Any
    lora: Any
    adapter_path: str | None
    gradient_checkpointing: bool
    trust_remote_code: bool
    attn_implementation: str
    train_top_layers: int | None = None  # LoRA on the top N layers only (mint/optim/trunk.py)

    def loader_arguments(self, cache_dir: str, corpus: Sequence[str], with_adapter: bool) -> dict[str, Any]:
        """What both loaders take (`load_student`, `load_vision_student`); `with_adapter=False`
        loads the untouched base (optim=none|rag) or only the saved adapter."""
        return dict(
            cache_dir=cache_dir,
            build=self.build,
            corpus=corpus,
            dtype=self.dtype,
            quantization=self.quantization,
            lora=self.lora if with_adapter else None,
            adapter_path=self.adapter_path,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        )


@dataclass(frozen=True)
class TextLengths:
    """Token budgets of a text pair (task.max_length, max_prompt_length, prompt_truncation)."""

    max_length: int
    max_prompt_length: int
    prompt_truncation: str


class TextStudent:
    """A causal LM that reads the sample's text."""

    modality = Modality.text
    sides_forward: SidesForward = staticmethod(text_sides_logits)

    def load(
        self, spec: StudentSpec, *, cache_dir: str, corpus: Sequence[str], with_adapter: bool
    ) -> tuple[torch.nn.Module, Any]:
        arguments = spec.loader_arguments(cache_dir, corpus, with_adapter)
        return load_student(
            spec.name_or_path, gguf_file=spec.gguf_file, train_top_layers=spec.train_top_layers, **arguments
        )

    def tokenizer(self, processor: Any) -> Any:
        return processor

    def prompt(self, template: PromptTemplate, sample: Sample) -> list[dict[str, Any]]:
        return template.text_messages(sample)

    def held_out_prompt(self, template: PromptTemplate) -> Callable[[Sample], list[dict]] | None:
        """How a sample's prompt reads, for the leakage check of preference rows by prompt."""
        return lambda sample: self.prompt(template, sample)

    def student_input(self, sample: Sample) -> bytes:
        """What the student reads of `sample`, for the leakage checks (b"" when nothing)."""
        return normalise_text(sample.text).encode()

    def shown_image(self, sample: Sample) -> np.ndarray | None:
        """The image the student sees with `sample` (the predictions table shows it): none."""
        return None

    def attach_images(self, rows: list[dict], task: TaskData) -> None:
        """Nothing to attach: a text row holds all the student reads."""

    def encode(
        self, processor: Any, rows: list[dict], lengths: TextLengths
    ) -> tuple[list[Any], TruncationReport | None]:
        if not rows:
            return [], None
        return tokenize_preference_rows(
            rows,
            processor,
            max_length=lengths.max_length,
            max_prompt_length=lengths.max_prompt_length,
            prompt_truncation=lengths.prompt_truncation,
        )

    def collator(self, processor: Any, packed: bool) -> Callable[[Sequence[Any]], dict[str, torch.Tensor]]:
        if packed:
            return PackedPreferenceCollator(processor.pad_token_id)
        return PreferenceCollator(pad_token_id=processor.pad_token_id)

    def label_scores(
        self,
        model: torch.nn.Module,
        processor: Any,
        prompt: list[dict],
        image: np.ndarray | None,
        candidates: list[list[int]],
    ) -> torch.Tensor:
        """Summed log-prob of each candidate answer; the prompt's KV cache is shared by all."""
        return score_candidates(model, processor, self.prompt_ids(processor, prompt), candidates).summed

    def prompt_ids(self, processor: Any, prompt: list[dict]) -> list[int]:
        """The prompt's token ids as the student reads them before its answer."""
        text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return processor(text, add_special_tokens=False)["input_ids"]

    def ranking_prompts(
        self, processor: Any, prompts: list[list[dict]], images: list[np.ndarray | None]
    ) -> tuple[list[list[int]], RowInputs | None]:
        """For ranking on trunk states: each prompt's token ids, and no more inputs (text only)."""
        return [self.prompt_ids(processor, prompt) for prompt in prompts], None

    def generation_inputs(
        self, processor: Any, images: list[np.ndarray] | None
    ) -> Callable[[list[str], range], Any] | None:
        return None  # generate_answers tokenizes the text itself


class ImageStudent:
    """An image+text model (Mllama) that reads the sample's image and a fixed question."""

    modality = Modality.image
    sides_forward: SidesForward = staticmethod(image_sides_logits)

    def load(
        self, spec: StudentSpec, *, cache_dir: str, corpus: Sequence[str], with_adapter: bool
    ) -> tuple[torch.nn.Module, Any]:
        if spec.gguf_file is not None:
            raise ValueError("student.gguf_file: GGUF loading is for text students only")
        # train_top_layers: refused (mint.optim.trunk.top_start) unless the image enters in the top
        # layers only, as in student=smollm2_vision (mint/student/llama_vision.py).
        return load_vision_student(
            spec.name_or_path,
            train_top_layers=spec.train_top_layers,
            **spec.loader_arguments(cache_dir, corpus, with_adapter),
        )

    def tokenizer(self, processor: Any) -> Any:
        return processor.tokenizer

    def prompt(self, template: PromptTemplate, sample: Sample) -> list[dict[str, Any]]:
        return template.image_messages(sample)

    def held_out_prompt(self, template: PromptTemplate) -> Callable[[Sample], list[dict]] | None:
        """None: the prompt is the same question for every sample; the images themselves are
        compared (`student_input`)."""
        return None

    def student_input(self, sample: Sample) -> bytes:
        if sample.image is None:
            return b""
        return sample.image.tobytes() + str(sample.image.shape).encode()

    def shown_image(self, sample: Sample) -> np.ndarray | None:
        return sample.image

    def attach_images(self, rows: list[dict], task: TaskData) -> None:
        """JSONL rows hold no pixels: each row's image comes from the task by sample id."""
        images = {s.id: s.image for split in ("train", "val") for s in task.splits[split]}
        for row in rows:
            row["images"] = [images[row["id"]]]

    def encode(
        self, processor: Any, rows: list[dict], lengths: TextLengths
    ) -> tuple[list[Any], TruncationReport | None]:
        # The processor renders the chat template with the image token and preprocesses the pixels.
        pairs = [
            encode_vision_pair(
                processor, row["images"][0], row["prompt"], row["chosen"], row["rejected"], lengths.max_length
            )
            for row in rows
        ]
        return pairs, None

    def collator(self, processor: Any, packed: bool) -> Callable[[Sequence[Any]], dict[str, torch.Tensor]]:
        pad = processor.tokenizer.pad_token_id
        return PackedVisionCollator(pad) if packed else VisionPreferenceCollator(pad)

    def label_scores(
        self,
        model: torch.nn.Module,
        processor: Any,
        prompt: list[dict],
        image: np.ndarray | None,
        candidates: list[list[int]],
    ) -> torch.Tensor:
        """Summed log-prob of each candidate answer; the prompt's KV cache (the image's keys and
        values in the cross-attention layers included) is shared by all."""
        # The pair's answers are placeholders: only its prompt ids and image tensors are used.
        # No length cap: training's max_length is not a limit for scoring (a RAG prompt is longer).
        pair = encode_vision_pair(processor, image, prompt, "-", "-", max_length=sys.maxsize)
        extra = image_prompt_inputs(model, pair)
        return score_candidates(
            model, processor.tokenizer, pair.prompt_ids, candidates, extra_inputs=extra
        ).summed

    def ranking_prompts(
        self, processor: Any, prompts: list[list[dict]], images: list[np.ndarray | None]
    ) -> tuple[list[list[int]], RowInputs | None]:
        """For ranking on trunk states: each prompt's token ids (the image token in them), and the
        image inputs of its rows (`image_row_inputs`): the image enters above the trunk."""
        pairs = [
            encode_vision_pair(processor, image, prompt, "-", "-", max_length=sys.maxsize)
            for prompt, image in zip(prompts, images, strict=True)
        ]
        return [pair.prompt_ids for pair in pairs], image_row_inputs(pairs)

    def generation_inputs(
        self, processor: Any, images: list[np.ndarray] | None
    ) -> Callable[[list[str], range], Any] | None:
        def inputs(texts: list[str], indices: range) -> Any:
            return processor(
                images=[[images[i]] for i in indices], text=texts, padding=True, return_tensors="pt"
            )

        return inputs


StudentKind = TextStudent | ImageStudent
KINDS: dict[Modality, StudentKind] = {Modality.text: TextStudent(), Modality.image: ImageStudent()}


def modality(value: str, key: str) -> Modality:
    """`value` of config `key` as a Modality; an old spelling is refused with the new one named."""
    if value in RENAMED:
        raise ValueError(f"{key}={value!r} is now spelt {key}={RENAMED[value]}")
    try:
        return Modality(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected one of {[m.value for m in Modality]}") from None


def student_kind(cfg: Any) -> StudentKind:
    """The run's student kind (from its `task` and `student` config); fails before any work when
    the student cannot read what the task gives."""
    wants = modality(cfg.task.get("student_modality", "text"), "task.student_modality")
    has = modality(cfg.student.modality, "student.modality")
    if wants is not has:
        example = "student=tiny_mllama" if wants is Modality.image else "student=tiny_llama"
        article = "an" if has is Modality.image else "a"
        raise ValueError(
            f"task={cfg.task.name} gives the student {wants} input, but student={cfg.student.name} is "
            f"{article} {has} model; pick a matching student (e.g. {example})"
        )
    return KINDS[has]
