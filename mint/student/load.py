"""Load the student LLM: a tiny one built from config, a GGUF file, or any HF causal LM.

Every source ends in the same `from_pretrained` call on a folder (or hub id), followed
by optional k-bit preparation, gradient checkpointing and a LoRA adapter.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from mint.files import build_atomically, sha256_hex
from mint.student.gguf import convert_gguf

log = logging.getLogger("mint.student")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_student(
    name_or_path: str | None,
    *,
    cache_dir: str,
    build: Callable[..., Path] | None = None,
    corpus: Sequence[str] | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    quantization: transformers.BitsAndBytesConfig | None = None,
    lora: peft.LoraConfig | None = None,
    adapter_path: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    train_top_layers: int | None = None,
) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` in train mode, with only the adapter trainable when one is used."""
    check_load_settings(dtype, quantization)
    students = Path(cache_dir) / "students"

    if name_or_path is None:
        source = built_source(students, "tiny", build, corpus)
    elif gguf_file is not None:
        gguf_path = (Path(name_or_path).expanduser() / gguf_file).resolve()
        if not gguf_path.is_file():
            raise FileNotFoundError(
                f"student.gguf_file={gguf_file!r} is not a file in student.name_or_path={name_or_path!r} "
                f"(looked for {gguf_path})"
            )
        stat = gguf_path.stat()  # a file replaced in place has another size or modification time
        key = _short_hash(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}")
        source = _materialize(
            students / f"gguf-{key}", lambda out: convert_gguf(str(gguf_path.parent), gguf_path.name, out)
        )
    else:
        source = Path(name_or_path).expanduser()

    tokenizer = _load_tokenizer(name_or_path, source, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        quantization_config=quantization,
    )

    model = prepare_for_training(model, quantization, gradient_checkpointing)
    if train_top_layers is not None and lora is not None and adapter_path is None:
        from mint.optim.trunk import top_lora

        lora = top_lora(lora, model, train_top_layers)  # LoRA on the top layers' linear modules only
    model = attach_adapter(model, lora, adapter_path)
    log_parameters("student", source, model)
    return model, tokenizer


# --- steps shared with mint.student.vision.load_vision_student ----------------------
def check_load_settings(dtype: str, quantization: transformers.BitsAndBytesConfig | None) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"student.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "student.quantization is set, but bitsandbytes is not installed: `pip install -e '.[quant]'` "
            "(or `pip install 'mint[quant]'`), or set student.quantization=null"
        )


def built_source(
    students: Path, prefix: str, build: Callable[..., Path] | None, corpus: Sequence[str] | None
) -> Path:
    """The folder of a student made by `build(out_dir, corpus)`, built once per settings and corpus."""
    if build is None or corpus is None:
        raise ValueError("student.name_or_path is null: a student.build and a tokenizer corpus are needed")
    return _materialize(students / f"{prefix}-{_build_key(build, corpus)}", lambda out: build(out, corpus))


def not_found(name_or_path: str | None, source: Path, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"student.name_or_path={name_or_path!r}: {source} is not a local directory, and no model of "
        f"that id could be loaded from the Hugging Face Hub (offline runs need a local copy): {err}"
    )


def prepare_for_training(
    model: torch.nn.Module, quantization: transformers.BitsAndBytesConfig | None, gradient_checkpointing: bool
) -> torch.nn.Module:
    gc_kwargs = {"use_reentrant": False}  # non-reentrant: gradients reach LoRA without input-grad hooks
    if quantization is not None:
        return peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model


def attach_adapter(
    model: torch.nn.Module,
    lora: peft.LoraConfig | None,
    adapter_path: str | None,
    default_targets: Any = None,
) -> torch.nn.Module:
    """A saved adapter (kept trainable), or a fresh LoRA adapter, or none; the model in train mode.

    `default_targets` replaces `target_modules` when the config leaves it None or "all-linear"
    (the vision student narrows LoRA to its language layers and projector).
    """
    if adapter_path is not None:
        # The adapter's saved config decides its shape; `lora` would describe a fresh one.
        model = peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    elif lora is not None:
        lora = copy.deepcopy(lora)  # get_peft_model writes into its config; keep the caller's intact
        if lora.task_type is None:
            lora.task_type = peft.TaskType.CAUSAL_LM
        if default_targets is not None and lora.target_modules in (None, "all-linear"):
            lora.target_modules = default_targets
        model = peft.get_peft_model(model, lora)
    model.train()  # transformers 5 returns models in eval mode
    return model


def log_parameters(kind: str, source: Path, model: torch.nn.Module) -> None:
    # PeftModel forwards `num_parameters` to the wrapped transformers model, which counts 4-bit weights right.
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    log.info(
        "%s %s: %d trainable / %d total parameters (%.2f%%), base in %s",
        kind,
        source,
        trainable,
        total,
        100 * trainable / total,
        str(model.dtype).removeprefix("torch."),
    )


def _load_tokenizer(
    name_or_path: str | None, source: Path, trust_remote_code: bool
) -> transformers.PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except OSError as err:
        if source.exists():
            raise
        raise not_found(name_or_path, source, err) from err
    if tokenizer.chat_template is None:
        raise ValueError(f"student.name_or_path={name_or_path!r}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _build_key(build: Callable[..., Path], corpus: Sequence[str]) -> str:
    """Hash of everything that determines a built student: the builder, its keyword arguments, and
    the corpus, or instead what the builder's `source_identity(**kwargs)` names (a builder that
    starts from a model on disk and does not read the corpus, e.g. build_mllama_from_llama)."""
    func = getattr(build, "func", build)
    kwargs = getattr(build, "keywords", {})
    spec = {"builder": f"{func.__module__}.{func.__qualname__}", "kwargs": kwargs}
    identify = getattr(func, "source_identity", None)
    source = identify(**kwargs) if identify is not None else None
    if source is None:
        spec["corpus"] = list(corpus)
    else:
        spec["source"] = source
    return _short_hash(json.dumps(spec, sort_keys=True))


def _short_hash(text: str) -> str:
    return sha256_hex(text)[:12]


def _materialize(target: Path, make: Callable[[Path], object]) -> Path:
    """`target`, built once by `make(folder)`: complete or absent, also when two processes race."""
    if target.is_dir():
        return target
    log.info("building student %s", target)
    return build_atomically(target, make)
