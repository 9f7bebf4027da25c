"""Structured-config schemas, registered in Hydra's ConfigStore.

Each group's YAML files start from one of these schemas (`defaults: [<schema>, _self_]`),
so a misspelt key or a value of the wrong type fails at composition time with
Hydra's message naming the key, instead of being silently ignored.
Code holds the wiring, these hold the knobs; numbers live in conf/.
"""

from __future__ import annotations

import dataclasses
import os
import typing
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


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric config value (None: no limit on that side)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def contains(self, value: float) -> bool:
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def __str__(self) -> str:
        ops = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        return " and ".join(f"{op} {v:g}" for op, v in ops if v is not None)


def bounded(default: Any = MISSING, **limits: float) -> Any:
    """A schema field whose value `check_config` keeps within `limits` (gt, ge, lt, le)."""
    return field(default=default, metadata={"bounds": Bounds(**limits)})


def chosen_from(default: Any, *choices: str) -> Any:
    """A string schema field whose value `check_config` keeps among `choices`."""
    return field(default=default, metadata={"choices": choices})


class OnError(StrEnum):
    strict = "strict"
    skip = "skip"


@dataclass
class ExamplePrefsConfig:
    """The generated toy preference set of task=example (mint/data/example_prefs.py)."""

    n: int = bounded(400, ge=2)  # at least one row to train on and one to validate with
    seed: int = bounded(0, ge=0)


@dataclass
class CustomTaskConfig:
    """Any TRL-format preference dataset: JSONL/JSON/Parquet/CSV, a `save_to_disk` folder, a
    folder of data files or a Hub id (mint.pairs.rows.ACCEPTED_FORMS)."""

    name: str = "custom"
    prefs_path: str = MISSING
    prefs_split: str = "train"  # the split to read from a data folder or a Hub dataset
    on_error: OnError = OnError.strict
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # held out from prefs_path for the val/ metrics
    max_samples: int | None = bounded(None, ge=1)  # keep the first N rows (debug)
    max_length: int = bounded(512, ge=2)  # prompt + answer, in tokens
    max_prompt_length: int = bounded(384, ge=1)  # < max_length
    prompt_truncation: PromptTruncation = PromptTruncation.keep_end
    # When set and prefs_path does not exist yet, the example set is generated there.
    example: ExamplePrefsConfig | None = None


@dataclass
class AnswerConfig:
    header: str = MISSING  # e.g. "POTENTIAL_DISEASES:"
    n: int = bounded(ge=1)  # names per answer: the teacher's top-k that become `chosen`


@dataclass
class PromptConfig:
    system: str = MISSING
    user: str = MISSING  # `{text}` is replaced by the sample's text (the note) for a text student


@dataclass
class PrefsConfig:
    q: int = bounded(10, ge=1)  # names in `rejected`
    # bottom: the teacher's least likely (the paper); hard: ranks k+1..k+q
    negatives: str = chosen_from("bottom", "bottom", "hard")
    force_truth: bool = False  # put the true label into `chosen` when the teacher missed it
    # teacher: lists ordered by the teacher (MINT); truth: the true label first, the rest in a
    # random order per sample - the teacher-free ablation ("SFT on the true label alone");
    # truth_then_teacher: the true label first, then the teacher's order without it
    ranking: str = chosen_from("teacher", "teacher", "truth", "truth_then_teacher")


@dataclass
class EvalConfig:
    # The answer's length budget (the decoding strategy is the `generation` group's; a
    # generation.max_new_tokens, when set, wins).
    max_new_tokens: int = bounded(512, ge=1)
    batch_size: int = bounded(16, ge=1)
    # Greedy decoding of a weak student repeats its favourite name down the list; true masks
    # tokens that can only repeat a name already listed (mint.eval.constraints). The metric is
    # unchanged: an answer is valid only with the header and n distinct known names.
    no_repeated_names: bool = False
    # Closed-set decoding: inside an item only a label not yet listed can be written (a student
    # that misspells names gets the nearest known spelling its own scores prefer). Off by default.
    known_names_only: bool = False
    max_samples: int | None = bounded(None, ge=1)  # evaluate N samples of each evaluated split, spread evenly
    n_boot: int = bounded(1000, ge=1)  # bootstrap resamples for the 95% CIs
    # Also generate for the validation split and report val/format_valid, val/top1, val/topk:
    # what hyperparameter search optimises (the test split must never steer choices).
    on_val: bool = False
    # Rank the validation split's labels after every validation pass of training (val/rank_top1,
    # val/rank_topk): the task's metric along the learning curve. On cached trunk states for a text
    # student with train_top_layers (SmolLM2: ~0.13 s a note), else at full depth.
    val_ranking: bool = False


@dataclass
class PipelineTaskConfig:
    """A MINT task: data source -> teacher -> preference pairs -> student -> evaluation."""

    name: str = MISSING
    source: Any = MISSING  # `_target_` node returning a mint.data.task_data.TaskData
    student_modality: str = "text"  # what the student sees: text (the note) or image (mint/student/kinds.py)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # train the student on N preference pairs, spread over the classes
    max_samples: int | None = bounded(None, ge=1)
    max_length: int = bounded(1024, ge=2)
    max_prompt_length: int = bounded(768, ge=1)  # < max_length
    prompt_truncation: PromptTruncation = PromptTruncation.keep_end


@dataclass
class TeacherPretrainConfig:
    """Contrastive pretraining of the teacher's tower on an image-caption corpus (as PLIP was
    made; mint/teacher/pretrain.py), before it meets the task. One cache entry serves every
    run seed and method: `seed` here is the pretraining's own."""

    # `_target_` node returning the corpus TaskData (train + val); called with train_per_tissue
    corpus: Any = MISSING
    scale: float = bounded(10.0, gt=0)  # corpus training images per task training image
    zero_shot: bool = False  # true: use the pretrained tower as is; false: fine-tune it on the task
    batch_size: int = bounded(128, ge=2)  # contrastive batches: more negatives per step
    lr: float = bounded(2e-3, gt=0)  # pretraining's; teacher.model.lr is the fine-tuning's
    seed: int = 0
    # Epochs and early stopping (on zero-shot MRR over the corpus val part) follow
    # teacher.trainer.max_epochs and teacher.patience.


@dataclass
class TeacherConfig:
    pretrain: TeacherPretrainConfig | None = None  # null: the teacher learns from the task alone
    model: Any = MISSING  # `_partial_` node: called with the TaskData, returns the teacher LightningModule
    # cross-fitting folds for out-of-fold training rankings (1: in-sample, debugging only)
    folds: int = bounded(5, ge=1)
    batch_size: int = bounded(64, ge=1)
    patience: int = bounded(5, ge=1)  # early stopping on validation top-k
    fit_threads: int | None = bounded(1, ge=1)  # torch threads while fitting; null keeps the process setting
    # How many of the full fit and the cross-fit folds train at once, each in a forked process
    # with fit_threads threads (CPU only). The scores do not depend on it.
    fit_workers: int = bounded(1, ge=1)
    trainer: dict[str, Any] = field(default_factory=dict)  # Lightning Trainer arguments for each fit


@dataclass
class RagConfig:
    """optim=rag: retrieval over a knowledge base built from the training side (mint/rag/)."""

    top_k: int = bounded(3, ge=1)  # passages per prompt (the paper: 3)
    text_cutoff: float = bounded(0.5, ge=-1, le=1)  # MiniLM cosine below which a passage is dropped
    image_cutoff: float = bounded(0.8, ge=-1, le=1)  # stain-statistics cosine cutoff (tissue)
    chunk_tokens: int = bounded(64, ge=1)  # MiniLM tokens per chunk
    chunk_overlap: int = bounded(8, ge=0)  # < chunk_tokens
    text_max_length: int = bounded(256, ge=3)  # MiniLM's input length ([CLS] + a token + [SEP])
    template: str = MISSING  # str.format with {passages} and {user}: the augmented user turn


@dataclass
class OptimConfig:
    """The alignment method and its optimisation settings."""

    method: Method = MISSING
    beta: float = bounded(0.1, gt=0)  # ORPO lambda / DPO beta: <= 0 would optimise the wrong way
    rpo_alpha: float | None = bounded(None, ge=0)  # DPO only: weight of an NLL term on the chosen answer
    # DPO only: first train SFT on the same prompts (chosen as target; cached) and start DPO,
    # and its reference, from that adapter, as the paper does. Ignored with student.adapter_path.
    init_from_sft: bool = False
    sft_on_prompt: bool = False  # NLL over prompt+chosen (TRL's ORPO) instead of chosen only
    packed: bool = True  # one [prompt, chosen, rejected] row per pair (mint/pairs/packed.py); false: two
    # Packed only: batches of rows of similar length (less padding; mint/pairs/packed.py); false:
    # a plain seeded shuffle, as unpacked training has.
    length_grouped: bool = False
    # The tokens of an answer's k-th name weigh k^-p in every method's NLL and log-probs, the format
    # (header, numbers, quotes, end) 1 (mint/pairs/weights.py); 0: every token weighs 1, as TRL.
    answer_rank_decay: float = bounded(0.0, ge=0)

    batch_size: int = bounded(8, ge=1)
    eval_batch_size: int = bounded(16, ge=1)
    warmup_ratio: float = bounded(0.1, ge=0, lt=1)
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
    dtype: str = chosen_from("float32", "float32", "bfloat16", "float16")
    quantization: Any = None  # `_target_: transformers.BitsAndBytesConfig` node, see conf/quant/
    lora: Any = None  # `_target_: peft.LoraConfig` node; null = no adapter
    adapter_path: str | None = None  # start from a saved PEFT adapter
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str = chosen_from(
        "sdpa", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"
    )
    # LoRA on the top N decoder layers only, trained on cached states of the frozen layers below
    # (mint/optim/trunk.py); null: all layers. An image student only when its image enters in those
    # top layers (student=smollm2_vision).
    train_top_layers: int | None = bounded(None, ge=1)
    learning_rate: float = bounded(5e-5, gt=0)  # what suits this student; optim.optimizer.lr reads it


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments MINT uses; add one here before using it."""

    _target_: str = "lightning.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = bounded(1, ge=1)
    precision: Any = "32-true"
    max_steps: int = bounded(300, ge=-1)  # -1: no step limit (max_epochs decides)
    max_epochs: int | None = bounded(None, ge=-1)
    gradient_clip_val: float | None = bounded(1.0, gt=0)
    accumulate_grad_batches: int = bounded(1, ge=1)
    log_every_n_steps: int = bounded(10, ge=1)
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = bounded(1, ge=1)
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = bounded(0, ge=-1)
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
    # transformers.GenerationConfig fields, key for key (conf/generation/; checked by
    # mint.eval.generate.check_generation: an unknown key or a value it refuses stops the run)
    generation: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = MISSING
    seed: int = bounded(42, ge=0)
    stage: Stage = Stage.all
    run_name: str = MISSING
    ckpt_path: str | None = None  # resume training from this Lightning checkpoint
    # Continue from the last checkpoint of this run's folder or of the newest earlier run with
    # the same config (mint/resume.py); nothing found: start from scratch.
    resume: bool = False
    # The results key main() returns: what a Hydra sweeper (hparams_search=...) optimises.
    objective: str = "val/rewards/accuracies"


class ConfigError(ValueError):
    """A config value outside what its key allows; the message names the key, the value and the range."""


def check_config(cfg: DictConfig) -> None:
    """Check every bounded or enumerated value of the composed config, and the rules between keys.

    Hydra has already refused misspelt keys and wrong types; this refuses values no run can use
    (a negative beta trains the wrong way, a zero batch size fails deep inside torch), before any
    stage runs. All problems are reported at once.
    """
    problems = [
        f"{key}={value!r}: expected {allowed}"
        for key, value, allowed in _field_problems(cfg, "", MintConfig) + _rule_problems(cfg)
    ]
    if problems:
        raise ConfigError("; ".join(problems))
    from mint.eval.generate import check_generation  # transformers: imported when a run starts

    check_generation(cfg.get("generation") or {})
    from mint.extras import check_packages  # here: a missing package fails at start, not after the teacher

    check_packages(cfg)


def _field_problems(cfg: DictConfig, prefix: str, schema: type) -> list[tuple[str, Any, str]]:
    """(key, value, allowed) for each field of `schema` at `prefix` whose value breaks its metadata."""
    problems = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None or value == MISSING:  # unset optional values and `???` are Hydra's to refuse
            continue
        nested = _schema_of(hints[f.name], value)
        if nested is not None:
            problems += _field_problems(cfg, f"{key}.", nested)
        elif "bounds" in f.metadata and not f.metadata["bounds"].contains(value):
            problems.append((key, value, str(f.metadata["bounds"])))
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            problems.append((key, value, f"one of {list(f.metadata['choices'])}"))
    return problems


def _schema_of(hint: Any, value: Any) -> type | None:
    """The dataclass schema a field's value follows, if any (`task` is one of two, by content)."""
    if hint is Any and isinstance(value, DictConfig) and "prefs_path" in value:
        return CustomTaskConfig
    if hint is Any and isinstance(value, DictConfig) and "source" in value and "answer" in value:
        return PipelineTaskConfig
    candidates = [hint, *typing.get_args(hint)]
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _rule_problems(cfg: DictConfig) -> list[tuple[str, Any, str]]:
    """Ranges that depend on another key, and the values inside `_target_` nodes MINT relies on."""
    problems = []
    task = cfg.task
    if task.max_prompt_length >= task.max_length:
        problems.append(
            ("task.max_prompt_length", task.max_prompt_length, f"< task.max_length ({task.max_length})")
        )
    rag = cfg.optim.get("rag")
    if rag is not None and rag.chunk_overlap >= rag.chunk_tokens:
        problems.append(
            ("optim.rag.chunk_overlap", rag.chunk_overlap, f"< optim.rag.chunk_tokens ({rag.chunk_tokens})")
        )
    teacher = cfg.get("teacher")
    if teacher is not None and teacher.get("fit_workers", 1) > 1:
        accelerator = (teacher.get("trainer") or {}).get("accelerator", "cpu")
        if accelerator != "cpu":
            # A CUDA context does not survive a fork; one GPU fit at a time is the GPU's way.
            problems.append(
                (
                    "teacher.fit_workers",
                    teacher.fit_workers,
                    f"1 with teacher.trainer.accelerator={accelerator}",
                )
            )
        if teacher.get("fit_threads") is None:
            problems.append(
                (
                    "teacher.fit_workers",
                    teacher.fit_workers,
                    "1 unless teacher.fit_threads is set (threads per worker)",
                )
            )
    lora = cfg.student.get("lora")
    if lora is not None:
        for name, bounds in (
            ("r", Bounds(ge=1)),
            ("lora_alpha", Bounds(gt=0)),
            ("lora_dropout", Bounds(ge=0, lt=1)),
        ):
            if lora.get(name) is not None and not bounds.contains(lora[name]):
                problems.append((f"student.lora.{name}", lora[name], str(bounds)))
    optimizer = cfg.optim.get("optimizer")
    if optimizer is not None and optimizer.get("lr") is not None and not optimizer.lr > 0:
        problems.append(("optim.optimizer.lr", optimizer.lr, "> 0"))
    return problems


def plain(node: Any) -> Any:
    """A config node as plain data (resolved), e.g. for a cache key; anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16: a LoRA training step ran 37x slower than in float32 on an AVX2 EPYC
    (experiments/README.md section 8; README, "Picking a pretrained student")."""
    import torch  # here, not at the top: composing a config needs no torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def if_cpu_bf16(native: str, emulated: str) -> str:
    """${mint.if_cpu_bf16:A,B}: A where the CPU computes bf16 in hardware, else B. The CPU
    experiments pick their dtype and precision with it (conf/experiment/smollm2_*.yaml)."""
    return native if cpu_computes_bf16() else emulated


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
    if not OmegaConf.has_resolver("mint.if_cpu_bf16"):
        OmegaConf.register_new_resolver("mint.if_cpu_bf16", if_cpu_bf16)
    if not OmegaConf.has_resolver("mint.cwd"):
        # Not ${hydra:runtime.cwd}: Hydra resolves the sweep dir before that exists.
        OmegaConf.register_new_resolver("mint.cwd", os.getcwd)
