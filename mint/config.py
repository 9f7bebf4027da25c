"""Structured-config schemas, registered in Hydra's ConfigStore.

Each group's YAML files start from one of these schemas (`defaults: [<schema>, _self_]`),
so a misspelt key or a value of the wrong type fails at composition time with
Hydra's message naming the key, instead of being silently ignored.
Code holds the wiring, these hold the knobs; numbers live in conf/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mint.files import package_dir


class Stage(StrEnum):
    """Where a run stops: each stage reads the one before from the cache."""

    all = "all"  # data -> teacher -> prefs -> student -> eval
    teacher = "teacher"  # stop after the teacher (train it or find it in the cache)
    prefs = "prefs"  # stop after the preference dataset
    student = "student"  # train the student, skip generation on the test split


class Method(StrEnum):
    """What the student stage does: align with a loss, or train nothing."""

    orpo = "orpo"
    dpo = "dpo"
    sft = "sft"
    none = "none"  # no training: measure the untouched base student
    rag = "rag"  # no training: the base student, its prompts augmented by retrieval (mint/rag/)

    @property
    def trains(self) -> bool:
        return self not in (Method.none, Method.rag)


class Modality(StrEnum):
    """What the student reads: the same word in task.student_modality and student.modality."""

    text = "text"
    image = "image"


class PromptTruncation(StrEnum):
    keep_end = "keep_end"  # TRL's default: the end of the prompt sits next to the answer
    keep_start = "keep_start"


class OnError(StrEnum):
    strict = "strict"
    skip = "skip"


@dataclass
class ExamplePrefsConfig:
    """The generated toy preference set of task=example (mint/data/example_prefs.py)."""

    n: int = 400
    seed: int = 0


@dataclass
class CustomTaskConfig:
    """Any TRL-format preference dataset (JSONL or a `save_to_disk` folder)."""

    name: str = "custom"
    prefs_path: str = MISSING
    on_error: OnError = OnError.strict
    val_fraction: float = 0.1  # held out from prefs_path for the val/ metrics
    max_samples: int | None = None  # keep the first N rows (debug)
    max_length: int = 512  # prompt + answer, in tokens
    max_prompt_length: int = 384
    prompt_truncation: PromptTruncation = PromptTruncation.keep_end
    # When set and prefs_path does not exist yet, the example set is generated there.
    example: ExamplePrefsConfig | None = None


@dataclass
class AnswerConfig:
    header: str = MISSING  # e.g. "POTENTIAL_DISEASES:"
    n: int = MISSING  # names per answer: the teacher's top-k that become `chosen`


@dataclass
class PromptConfig:
    system: str = MISSING
    user: str = MISSING  # `{text}` is replaced by the sample's text (the note) for a text student


@dataclass
class PrefsConfig:
    q: int = 10  # names in `rejected`
    negatives: str = "bottom"  # bottom: the teacher's least likely (the paper); hard: ranks k+1..k+q
    force_truth: bool = False  # put the true label into `chosen` when the teacher missed it


@dataclass
class EvalConfig:
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy by default: same seed, same answers
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    batch_size: int = 16
    # Greedy decoding of a weak student repeats its favourite name down the list; true masks
    # tokens that can only repeat a name already listed (mint.eval.constraints). The metric is
    # unchanged: an answer is valid only with the header and n distinct known names.
    no_repeated_names: bool = False
    max_samples: int | None = None  # evaluate the first N samples of each evaluated split (debug)
    n_boot: int = 1000  # bootstrap resamples for the 95% CIs
    # Also generate for the validation split and report val/format_valid, val/top1, val/topk:
    # what hyperparameter search optimises (the test split must never steer choices).
    on_val: bool = False


@dataclass
class PipelineTaskConfig:
    """A MINT task: data source -> teacher -> preference pairs -> student -> evaluation."""

    name: str = MISSING
    source: Any = MISSING  # `_target_` node returning a mint.data.task_data.TaskData
    student_modality: str = "text"  # what the student sees: text (the note) or image (a Modality)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_samples: int | None = None  # train the student on the first N preference pairs (debug)
    max_length: int = 1024
    max_prompt_length: int = 768
    prompt_truncation: PromptTruncation = PromptTruncation.keep_end


@dataclass
class TeacherConfig:
    model: Any = MISSING  # `_partial_` node: called with the TaskData, returns the teacher LightningModule
    folds: int = 5  # cross-fitting folds for out-of-fold training rankings (< 2: in-sample, debugging only)
    batch_size: int = 64
    patience: int = 5  # early stopping on validation top-k
    fit_threads: int | None = 1  # torch threads while fitting; null keeps the process setting (GPUs)
    trainer: dict[str, Any] = field(default_factory=dict)  # Lightning Trainer arguments for each fit


@dataclass
class RagConfig:
    """optim=rag: retrieval over a knowledge base built from the training side (mint/rag/)."""

    top_k: int = 3  # passages per prompt (the paper: 3)
    text_cutoff: float = 0.5  # MiniLM cosine below which a passage is dropped (rare_disease)
    image_cutoff: float = 0.8  # stain-statistics cosine below which a passage is dropped (tissue)
    chunk_tokens: int = 64  # MiniLM tokens per chunk
    chunk_overlap: int = 8
    text_max_length: int = 256  # MiniLM's input length for passages and queries
    template: str = MISSING  # str.format with {passages} and {user}: the augmented user turn


@dataclass
class OptimConfig:
    """The alignment method and its optimisation settings."""

    method: Method = MISSING
    beta: float = 0.1  # ORPO lambda / DPO beta
    rpo_alpha: float | None = None  # DPO only: weight of an NLL term on the chosen answer
    # DPO only: first train SFT on the same prompts (chosen as target; cached) and start DPO,
    # and its reference, from that adapter, as the paper does. Ignored with student.adapter_path.
    init_from_sft: bool = False
    sft_on_prompt: bool = False  # NLL over prompt+chosen (TRL's ORPO) instead of chosen only
    packed: bool = True  # one [prompt, chosen, rejected] row per pair (mint/pairs/packed.py); false: two

    batch_size: int = 8
    eval_batch_size: int = 16
    warmup_ratio: float = 0.1
    optimizer: Any = MISSING  # `_target_` node, `_partial_: true` (params come from the model)
    scheduler: Any = None  # `_target_` node, `_partial_: true`, called with warmup/total steps
    rag: RagConfig | None = None  # optim=rag only


@dataclass
class StudentConfig:
    """How to build or load the student (mint/student/); nested nodes are instantiated."""

    name: str = MISSING
    modality: str = "text"  # text: a causal LM; image: an image+text model (mint/student/kinds.py)
    name_or_path: str | None = None  # HF id or local folder; null = build with `build`
    build: Any = None  # `_partial_` node making a model on the spot (tiny students)
    gguf_file: str | None = None
    dtype: str = "float32"
    quantization: Any = None  # `_target_: transformers.BitsAndBytesConfig` node, see conf/quant/
    lora: Any = None  # `_target_: peft.LoraConfig` node; null = no adapter
    adapter_path: str | None = None  # start from a saved PEFT adapter
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    learning_rate: float = 5e-5  # what suits this student; optim.optimizer.lr reads it


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments MINT uses; add one here before using it."""

    _target_: str = "lightning.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_steps: int = 300
    max_epochs: int | None = None
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    deterministic: Any = True
    enable_progress_bar: bool = True
    enable_model_summary: bool = False


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    log_dir: str = MISSING
    output_dir: str = MISSING  # this run's folder (Hydra's run dir)
    cache_dir: str = MISSING  # stage artifacts shared between runs


@dataclass
class MintConfig:
    task: Any = MISSING  # each task's YAML extends its own schema (CustomTaskConfig, PipelineTaskConfig)
    teacher: TeacherConfig | None = None  # used by pipeline tasks only
    optim: OptimConfig = MISSING
    student: StudentConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = MISSING
    seed: int = 42
    stage: Stage = Stage.all
    run_name: str = MISSING
    ckpt_path: str | None = None  # resume training from this Lightning checkpoint
    # Continue from the last checkpoint of this run's folder or of the newest earlier run with
    # the same config (mint/resume.py); nothing found: start from scratch.
    resume: bool = False
    # The results key main() returns: what a Hydra sweeper (hparams_search=...) optimises.
    objective: str = "val/rewards/accuracies"


def plain(node: Any) -> Any:
    """A config node as plain data (resolved), e.g. for a cache key; anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="mint_schema", node=MintConfig)
    cs.store(group="task", name="custom_schema", node=CustomTaskConfig)
    cs.store(group="task", name="pipeline_schema", node=PipelineTaskConfig)
    cs.store(group="teacher", name="teacher_schema", node=TeacherConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="student", name="student_schema", node=StudentConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)
    if not OmegaConf.has_resolver("mint.package_dir"):
        OmegaConf.register_new_resolver("mint.package_dir", lambda package: str(package_dir(package)))
    if not OmegaConf.has_resolver("mint.cwd"):
        # Not ${hydra:runtime.cwd}: Hydra resolves the sweep dir before that exists.
        OmegaConf.register_new_resolver("mint.cwd", os.getcwd)
