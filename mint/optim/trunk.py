"""Train the top N layers only, on cached trunk states (`student.train_top_layers`).

With LoRA on the top N of L decoder layers and nothing trainable below them, the hidden states
after layer L-N of a token row never change during training. They are computed once per
(tokenized rows, base model, dtype, N, layout), in inference mode, and kept in the stage cache as
one `.npy` per split (in the model's dtype; bfloat16 stored as its raw 16 bits), memory-mapped when
read. A training step then runs only the top N layers, the final norm and the output layer (at the
answer positions only) on those states: `top_logits`.

Layouts: a packed pair is one sequence [prompt, chosen, rejected] (its 4D mask and position ids,
as `mint.optim.forward.packed_logps` builds them); an unpacked pair is two sequences,
prompt+chosen and prompt+rejected. Each sequence is stored without padding; `TrunkCollator` pads
with zeros (padding never reaches a real token) and puts the states into the batch, where the
forward finds them (`trunk_states`, or `chosen_trunk` / `rejected_trunk`, and `trunk_start`).

One trunk entry serves everything that starts from the same base: ORPO, DPO, DPO's SFT start and
its reference log-probs, and a sweep over beta or the learning rate.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from mint.cache import cached
from mint.eval.ranking import expanded_cache
from mint.pairs.packed import CHOSEN, PROMPT, PackedPreferenceCollator, packed_length
from mint.pairs.text import SIDES, as_item

log = logging.getLogger("mint.trunk")
Collator = Callable[[Sequence[Any]], dict[str, torch.Tensor]]
# Modules outside the decoder layers that may train without touching the trunk: the final norm
# and the output layer both come after it.
AFTER_TRUNK = ("lm_head", "norm")
# Modules of an image student (Mllama) that feed only its cross-attention layers: trainable without
# touching the trunk as long as every cross-attention layer lies in the top layers (`top_start`).
IMAGE_SIDE = ("vision_model", "multi_modal_projector")


# --------------------------------------------------------------------------- the model's parts


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under any PEFT wrapper."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    decoder = causal_lm(model).get_decoder()
    missing = [name for name in ("layers", "norm", "rotary_emb") if not hasattr(decoder, name)]
    if missing:
        raise ValueError(
            f"student.train_top_layers: {type(decoder).__name__} has no {missing}; only Llama-style "
            "decoders (layers, final norm, rotary embeddings) can train their top layers on cached states"
        )
    return decoder


def num_layers(model: torch.nn.Module) -> int:
    return causal_lm(model).config.get_text_config().num_hidden_layers


def top_start(model: torch.nn.Module, top_layers: int) -> int:
    """The index of the first trained layer, L - N."""
    total = num_layers(model)
    if not 1 <= top_layers < total:
        raise ValueError(
            f"student.train_top_layers={top_layers}: the student has {total} layers; train between 1 and "
            f"{total - 1} of them on cached states, or set it to null to train all"
        )
    start = total - top_layers
    below = [i for i in cross_attention_layers(model) if i < start]
    if below:
        raise ValueError(
            f"student.train_top_layers={top_layers}: the image enters through cross-attention layer(s) "
            f"{below}, below the top {top_layers} (from layer {start}), so the cached states would depend on "
            f"the image; raise it to at least {total - min(below)} or set it to null"
        )
    return start


def cross_attention_layers(model: torch.nn.Module) -> list[int]:
    """The decoder layers where an image enters (Mllama's cross-attention layers); [] for a text LM."""
    return list(getattr(causal_lm(model).config.get_text_config(), "cross_attention_layers", None) or [])


def _image_side(name: str) -> bool:
    """Is the module or parameter `name` part of an image student's vision tower or projector?"""
    return any(part in IMAGE_SIDE for part in name.split("."))


def top_lora(lora: peft.LoraConfig, model: torch.nn.Module, top_layers: int) -> peft.LoraConfig:
    """`lora` with its targets narrowed to the linear modules of the top `top_layers` decoder layers.

    Refuses `modules_to_save` below the top layers (e.g. embed_tokens): training them would change
    the cached trunk states. Allowed there: the final norm and output layer, whole top layers (e.g.
    an image student's new cross-attention layers, `language_model.layers.30`), and an image
    student's vision tower and projector, which only its cross-attention layers read. PEFT puts no
    LoRA inside a module it trains in full.
    """
    start = top_start(model, top_layers)
    lora = copy.deepcopy(lora)
    targets = lora.target_modules
    decoder = decoder_of(model)
    if targets in (None, "all-linear"):
        suffixes = sorted(
            {
                name.rsplit(".", 1)[-1]
                for layer in decoder.layers[start:]
                for name, module in layer.named_modules()
                if isinstance(module, torch.nn.Linear)
            }
        )
    elif isinstance(targets, str):
        raise ValueError(
            "student.train_top_layers with a regex student.lora.target_modules: list the module names "
            "instead (e.g. [q_proj, v_proj]) or use all-linear"
        )
    else:
        suffixes = sorted(targets)
    # Anchored at the decoder, so that no other stack (an image student's vision layers) matches.
    path = next(name for name, module in causal_lm(model).named_modules() if module is decoder)
    top = "|".join(str(i) for i in range(start, num_layers(model)))
    lora.target_modules = (
        rf"(.*\.)?{re.escape(path)}\.layers\.({top})\.(.*\.)?({'|'.join(map(re.escape, suffixes))})"
    )
    below = [m for m in lora.modules_to_save or [] if not _after_trunk(m, start)]
    if below:
        raise ValueError(
            f"student.train_top_layers={top_layers} with student.lora.modules_to_save={below}: these "
            f"modules lie below the trained layers, so the cached trunk states would go stale; keep only "
            f"{list(AFTER_TRUNK)}, layers from {start} up, or an image student's {list(IMAGE_SIDE)} there"
        )
    return lora


def _after_trunk(module: str, start: int) -> bool:
    """May `module` (a modules_to_save entry) train without changing the states below layer `start`?"""
    if module in AFTER_TRUNK or _image_side(module):
        return True
    layer = re.search(r"(^|\.)layers\.(\d+)$", module)
    return layer is not None and int(layer.group(2)) >= start


def check_top_only(model: torch.nn.Module, start: int, *, trainable: bool = True) -> None:
    """Every adapter weight (and, with `trainable`, every trainable parameter: for training) lies in
    layer `start` or above (or after the decoder layers): otherwise the trunk states would not be
    those the model computes."""
    bad = []
    image_above = all(i >= start for i in cross_attention_layers(model))
    for name, param in model.named_parameters():
        adapted = (trainable and param.requires_grad) or "lora_" in name or "modules_to_save" in name
        if not adapted or (image_above and _image_side(name)):  # the image side feeds the top layers only
            continue
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer is not None:
            if int(layer.group(1)) < start:
                bad.append(name)
        elif not any(f".{part}." in f".{name}." for part in AFTER_TRUNK):
            bad.append(name)
    if bad:
        raise ValueError(
            f"student.train_top_layers: {len(bad)} adapted or trainable parameter(s) lie below layer "
            f"{start}, e.g. {bad[0]}; the cached trunk states would not match the model (an adapter "
            "trained on all layers cannot continue on the top layers only)"
        )


class _Reached(Exception):
    """Raised by the hook on the last trunk layer: the rest of the forward is not needed."""

    def __init__(self, states: torch.Tensor):
        self.states = states


@torch.inference_mode()
def trunk_states(
    model: torch.nn.Module, start: int, inputs: dict[str, Any], cache: Any = None
) -> torch.Tensor:
    """Hidden states after decoder layer `start` - 1 ([N, T, H]): the decoder's own forward, stopped
    there (so whatever it does before its layers, e.g. embedding scaling, is done its way). With a
    `cache` (a transformers Cache), the rows continue the tokens it holds, and the layers below
    `start` add theirs to it."""
    decoder = decoder_of(model)

    def stop(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    handle = decoder.layers[start - 1].register_forward_hook(stop)
    try:
        decoder(**inputs, cache=cache, use_cache=cache is not None)
    except _Reached as reached:
        return reached.states
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {start - 1} never ran")


# Rows that start with this many identical tokens (an image task's prompt, the same for every image,
# and the same prompt under chosen and rejected) run those tokens once (`shared_prefix_states`).
MIN_SHARED_PREFIX = 16


def shared_prefix_length(input_ids: torch.Tensor, causal: torch.Tensor) -> int:
    """How many leading columns hold the same token in every row, each in the rows' plainly causal
    part (`causal` [B, T]: an unpacked row's real tokens; a packed row's prompt and chosen answer,
    before the rejected answer that restarts the positions), leaving each row a token of its own."""
    same = (input_ids == input_ids[:1]).all(0) & causal.all(0)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def shared_prefix_states(
    model: torch.nn.Module, start: int, inputs: dict[str, Any], shared: int
) -> torch.Tensor:
    """`trunk_states` of right-padded rows whose first `shared` tokens are the same: those run once,
    with a KV cache that every row's own tokens then continue (views of it, no copy). A packed
    batch's 4D mask gives the rest its rows of it: every key, the shared ones included."""
    ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs.get("position_ids")
    prefix_cache = DynamicCache()
    head = trunk_states(
        model,
        start,
        {"input_ids": ids[:1, :shared], "attention_mask": torch.ones_like(ids[:1, :shared])},
        prefix_cache,
    )
    rest = {"input_ids": ids[:, shared:], "attention_mask": mask[:, :, shared:] if mask.ndim == 4 else mask}
    if positions is not None:
        rest["position_ids"] = positions[:, shared:]
    rows = ids.shape[0]
    tail = trunk_states(model, start, rest, expanded_cache(prefix_cache, rows))
    return torch.cat([head.expand(rows, -1, -1), tail], dim=1)


def top_logits(
    model: torch.nn.Module, trunk: tuple[torch.Tensor, int], inputs: dict[str, Any], keep: torch.Tensor
) -> torch.Tensor:
    """Logits at the `keep` positions ([K, V]) from trunk states: layers `start`.. L-1, norm, head.

    `inputs`: what the full forward would get (attention_mask 2D or the packed 4D one, optional
    position_ids; an image student's cross_attention_states and cross_attention_mask); the mask goes
    through transformers' `create_causal_mask` as in the decoder.
    """
    from transformers.masking_utils import create_causal_mask

    states, start = trunk
    decoder = decoder_of(model)
    hidden = states.to(decoder.norm.weight.dtype)
    image = _cross_attention_inputs(model, inputs, hidden.dtype)
    cross = set(cross_attention_layers(model))
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=inputs["attention_mask"],
        cache=None,
        position_ids=position_ids,
    )
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for index in range(start, num_layers(model)):
        if index in cross and not image:
            continue  # no image: Mllama's text model skips its cross-attention layers too
        hidden = decoder.layers[index](
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=None,
            use_cache=False,
            **image,
        )
    hidden = decoder.norm(hidden)
    return causal_lm(model).get_output_embeddings()(hidden[keep])


def _cross_attention_inputs(
    model: torch.nn.Module, inputs: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """An image student's per-layer image inputs, made from `inputs` as MllamaModel.forward makes them
    (its own mask helper), or {} without an image."""
    if inputs.get("cross_attention_states") is None:
        return {}
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    states = inputs["cross_attention_states"]
    mask, full_rows = _prepare_cross_attention_mask(
        inputs["cross_attention_mask"], num_vision_tokens=states.shape[-2], dtype=dtype
    )
    return dict(
        cross_attention_states=states, cross_attention_mask=mask, full_text_row_masked_out_mask=full_rows
    )


# --------------------------------------------------------------------------- storing the states


@dataclass(frozen=True)
class Trunk:
    """Trunk states of a list of pairs: sequence i is `states[offsets[i]:offsets[i+1]]`.

    Packed: one sequence per pair. Unpacked: 2i is prompt+chosen, 2i+1 prompt+rejected.
    """

    states: np.ndarray  # [tokens, H], memory-mapped; bfloat16 as uint16
    offsets: np.ndarray  # [sequences + 1]
    dtype: torch.dtype
    start: int
    packed: bool

    def sequence(self, index: int) -> torch.Tensor:
        chunk = np.array(self.states[self.offsets[index] : self.offsets[index + 1]])  # a copy, not the map
        tensor = torch.from_numpy(chunk)
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor

    def padded(self, sequences: Sequence[int], length: int) -> torch.Tensor:
        """[len(sequences), length, H]: the sequences' states, zero-padded on the right."""
        parts = [self.sequence(i) for i in sequences]
        out = torch.zeros((len(parts), length, parts[0].shape[-1]), dtype=parts[0].dtype)
        for row, part in enumerate(parts):
            out[row, : part.shape[0]] = part
        return out

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> Trunk:
        meta = np.load(folder / "meta.npy", allow_pickle=False)
        dtype = getattr(torch, str(np.load(folder / "dtype.npy")))
        return cls(
            states=np.load(folder / "states.npy", mmap_mode="r" if mmap else None),
            offsets=np.load(folder / "offsets.npy"),
            dtype=dtype,
            start=int(meta[0]),
            packed=bool(meta[1]),
        )


def sequence_lengths(pairs: Sequence[Any], packed: bool) -> list[int]:
    if packed:
        return [packed_length(pair) for pair in pairs]
    lengths = []
    for pair in pairs:
        item = as_item(pair)
        lengths += [len(item["prompt_ids"]) + len(item[f"{side}_ids"]) for side in SIDES]
    return lengths


def build_trunk(
    model: torch.nn.Module,
    pairs: Sequence[Any],
    collator: Collator,
    start: int,
    folder: Path,
    batch_size: int,
) -> None:
    """Compute and write the trunk states of `pairs` (collated by `collator`) into `folder`."""
    from mint.optim.forward import attention_mask_for

    packed = isinstance(collator, PackedPreferenceCollator)
    order = sorted(range(len(pairs)), key=lambda i: packed_length(pairs[i]))

    def batches() -> Iterator[tuple[dict[str, torch.Tensor], list[int]]]:
        for first in range(0, len(pairs), batch_size):
            indices = order[first : first + batch_size]
            batch = collator([pairs[i] for i in indices])
            if packed:
                inputs = dict(
                    input_ids=batch["input_ids"],
                    attention_mask=attention_mask_for(model, batch["segment_ids"]),
                    position_ids=batch["position_ids"],
                    segment_ids=batch["segment_ids"],  # for write_trunk's shared prefix; no model input
                )
                yield inputs, indices
            else:
                sides = SIDES
                inputs = dict(
                    input_ids=torch.cat([batch[f"{side}_input_ids"] for side in sides]),
                    attention_mask=torch.cat([batch[f"{side}_attention_mask"] for side in sides]),
                )
                yield inputs, [2 * i for i in indices] + [2 * i + 1 for i in indices]

    total = -(-len(pairs) // batch_size)
    write_trunk(model, start, folder, sequence_lengths(pairs, packed), packed, batches(), total)


def write_trunk(
    model: torch.nn.Module,
    start: int,
    folder: Path,
    lengths: Sequence[int],
    packed: bool,
    batches: Iterable[tuple[dict[str, torch.Tensor], list[int]]],
    total: int,
) -> None:
    """Write the trunk states of sequences of `lengths` into `folder` (the `Trunk` layout).

    `batches`: `total` pairs of (model inputs of right-padded rows, the sequence index of each
    row); packed rows' inputs also carry their `segment_ids`. Rows that start with a long common
    prefix run it once (`shared_prefix_states`).
    """
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hidden = causal_lm(model).config.get_text_config().hidden_size
    dtype = decoder_of(model).norm.weight.dtype
    stored = np.uint16 if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))
    states = np.lib.format.open_memmap(
        folder / "states.npy", mode="w+", dtype=stored, shape=(int(offsets[-1]), hidden)
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for inputs, sequences in tqdm(batches, desc="trunk states", unit="batch", total=total):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        segment_ids = inputs.pop("segment_ids", None)
        shared = 0
        if not packed:
            shared = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"].bool())
        elif segment_ids is not None and isinstance(inputs["attention_mask"], torch.Tensor):
            # Pairs: the prompt and chosen answer are causal. (A ranking row carries no segment ids:
            # its candidates restart the positions; a FlexAttention BlockMask has no rows to cut.)
            shared = shared_prefix_length(
                inputs["input_ids"], (segment_ids == PROMPT) | (segment_ids == CHOSEN)
            )
        if shared >= MIN_SHARED_PREFIX:
            out = shared_prefix_states(model, start, inputs, shared)
        else:
            out = trunk_states(model, start, inputs)
        out = out.to(dtype).cpu()
        for row, sequence in enumerate(sequences):
            a, b = offsets[sequence], offsets[sequence + 1]
            values = out[row, : b - a]
            states[a:b] = (values.view(torch.uint16) if dtype == torch.bfloat16 else values).numpy()
    states.flush()
    del states
    model.train(was_training)
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "meta.npy", np.array([start, int(packed)], dtype=np.int64))
    np.save(folder / "dtype.npy", np.array(str(dtype).removeprefix("torch.")))


def cached_trunk(
    model: torch.nn.Module,
    pairs: Sequence[Any],
    collator: Collator,
    *,
    top_layers: int,
    batch_size: int,
    cache_dir: Path,
    base: dict[str, Any],
) -> Trunk:
    """`build_trunk` through the stage cache. `base`: what identifies the frozen base model (not its
    adapter: `check_top_only` makes sure no adapter reaches below the top layers)."""
    from mint.optim.reference import pairs_digest

    start = top_start(model, top_layers)
    check_top_only(model, start)
    packed = isinstance(collator, PackedPreferenceCollator)
    key = {
        "pairs": pairs_digest(pairs),
        "base": base,
        "dtype": str(decoder_of(model).norm.weight.dtype),
        "top_layers": top_layers,
        "packed": packed,
    }
    folder = cached(
        cache_dir, "trunk", key, lambda out: build_trunk(model, pairs, collator, start, out, batch_size)
    )
    return Trunk.load(folder)


def with_trunk_rows(pairs: Sequence[Any]) -> list[dict[str, Any]]:
    """The pairs as dicts that name their trunk sequence (`trunk_row`: the pair's index)."""
    return [{**as_item(pair), "trunk_row": index} for index, pair in enumerate(pairs)]


class TrunkCollator:
    """`inner`'s batch plus the trunk states of its pairs, zero-padded to the batch's length."""

    def __init__(self, inner: Collator, trunk: Trunk):
        self.inner = inner
        self.trunk = trunk

    def __call__(self, pairs: Sequence[Any]) -> dict[str, torch.Tensor]:
        items = [as_item(pair) for pair in pairs]
        batch = self.inner(items)
        rows = [item["trunk_row"] for item in items]
        batch["trunk_start"] = torch.tensor(self.trunk.start)
        if self.trunk.packed:
            batch["trunk_states"] = self.trunk.padded(rows, batch["input_ids"].shape[1])
        else:
            length = batch["chosen_input_ids"].shape[1]
            batch["chosen_trunk"] = self.trunk.padded([2 * r for r in rows], length)
            batch["rejected_trunk"] = self.trunk.padded([2 * r + 1 for r in rows], length)
        return batch
