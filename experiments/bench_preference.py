"""Preference-training throughput: MINT's packed ORPO/DPO step vs its unpacked step vs TRL.

MINT-shaped data (prompts ~512 tokens, answers ~64) on a small random Llama built from config,
float32 on the CPU, a LoRA adapter (r=16, all linear layers) as MINT's students use, the same
batch for every method. Reports work-equivalent tokens/s, i.e. per pair 2*prompt + chosen +
rejected (what an unpacked forward processes, so packing is not credited with tokens it skips),
medians over timed steps after warm-up, taken in rounds that alternate the methods so that
drifting load on a shared machine hits all of them alike.

    .venv/bin/python experiments/bench_preference.py [--threads N]   # needs `pip install -e '.[bench]'`
    .venv/bin/python experiments/bench_preference.py --quick    # a short smoke run
    python experiments/bench_preference.py --device cuda --dtype bfloat16 --model llama1b   # GPU (gpu_suite.sh)

On a GPU (`--device cuda`): the model is built on the GPU in `--dtype` (LoRA weights stay
float32), every method runs under bf16 autocast (TRL: `bf16=True`), steps are timed with CUDA
synchronisation, and peak memory is `torch.cuda.max_memory_allocated` during each method's steps
minus what was allocated before them (all runners share one process; the other methods' weights
are part of both numbers, so the difference is the method's activations, gradients and optimizer
state). `--model llama1b` is Llama-3.2-1B's shape (vocabulary 128,256, width 2048, 16 layers),
random weights; the token ids stay below 2048 (the word tokenizer's words).

Fairness choices:
- TRL's ORPO is `trl.experimental.orpo.ORPOTrainer`; its NLL term covers prompt + chosen, so
  MINT's ORPO runs with `sft_on_prompt=True` here (the same loss, checked on the first batch).
- TRL's DPO runs with `precompute_ref_log_probs=True` (the reference computed once before
  training, as MINT does), default loss (sigmoid, beta 0.1, no NLL term), `use_logits_to_keep`
  left at its default; MINT's DPO uses the same settings (`rpo_alpha=None`).
- Step time is the wall time from one optimizer step to the next: data collation, forward,
  backward and AdamW. TRL's trainers add their metric bookkeeping, which is part of using them.
- Gradient checkpointing: off for every method by default (MINT's default), `--gradient-checkpointing`
  turns it on for every method (TRL's default). Never mixed within a run.
- Peak memory: each method runs again in its own child process; the number is the peak resident
  set size (VmHWM) during its steps minus the resident size just before them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

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
from experiments.shapes import LLAMA1B  # noqa: E402
from mint.optim.module import PreferenceModule  # noqa: E402
from mint.optim.reference import attach_reference_logps  # noqa: E402
from mint.pairs.packed import LengthGroupedSampler, PackedPreferenceCollator, packed_length, padding_waste  # noqa: E402
from mint.pairs.text import PreferenceCollator, TokenizedPair  # noqa: E402

VOCAB = 2048
PAD, BOS, EOS = 0, 1, 2
METHODS = ("mint_packed_orpo", "mint_unpacked_orpo", "trl_orpo", "mint_packed_dpo", "trl_dpo")


@dataclass(frozen=True)
class Settings:
    pairs: int
    batch_size: int
    prompt_len: int
    answer_len: int
    rounds: int
    steps_per_round: int  # the first step of every round is warm-up, not timed
    hidden: int = 256
    layers: int = 4
    seed: int = 0
    gradient_checkpointing: bool = False  # TRL's default is True; applied to every method alike
    model: str = "small"  # small (hidden/layers above, vocabulary VOCAB) | llama1b
    device: str = "cpu"
    dtype: str = "float32"  # the base weights' dtype; bfloat16 also turns on bf16 autocast


def autocast(settings: Settings):
    """bf16 autocast when the base is bf16 (as Lightning's bf16-mixed and TRL's bf16=True)."""
    return torch.autocast(
        device_type=settings.device, dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16"
    )


def synchronize(settings: Settings) -> None:
    if settings.device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- data and model


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word 'w<i>': MINT's ids and TRL's tokenization of the same text agree exactly."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def make_pairs(settings: Settings) -> list[TokenizedPair]:
    """Prompts of prompt_len ±12%, answers of answer_len ±25%, answers sharing a short header."""
    rng = random.Random(settings.seed)

    def words(mean: int, spread: float) -> list[int]:
        n = rng.randint(int(mean * (1 - spread)), int(mean * (1 + spread)))
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    pairs = []
    for _ in range(settings.pairs):
        header = [rng.randrange(3, VOCAB) for _ in range(3)]  # like "POTENTIAL_DISEASES:"
        chosen = header + words(settings.answer_len - 4, 0.25) + [EOS]
        rejected = header + words(settings.answer_len - 4, 0.25) + [EOS]
        pairs.append(TokenizedPair([BOS] + words(settings.prompt_len - 1, 0.12), chosen, rejected))
    return pairs


def text(ids: list[int]) -> str:
    special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
    return " ".join(special.get(i, f"w{i}") for i in ids)


def build_model(settings: Settings) -> torch.nn.Module:
    torch.manual_seed(settings.seed)
    dims = (
        LLAMA1B
        if settings.model == "llama1b"
        else dict(
            vocab_size=VOCAB,
            hidden_size=settings.hidden,
            intermediate_size=settings.hidden * 8 // 3 // 32 * 32,
            num_hidden_layers=settings.layers,
            num_attention_heads=settings.hidden // 64,
            num_key_value_heads=settings.hidden // 64,
        )
    )
    config = LlamaConfig(
        **dims,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="sdpa",
    )
    with torch.device(settings.device):  # a 1B init on the CPU takes a minute
        model = LlamaForCausalLM(config).to(getattr(torch, settings.dtype))
    torch.manual_seed(settings.seed + 1)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora).train()
    if settings.gradient_checkpointing:  # as TRL enables it (non-reentrant)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# --------------------------------------------------------------------------- MINT runners


class MintRunner:
    """MINT's training step (PreferenceModule.compute_loss + backward + AdamW) over a data order."""

    def __init__(self, settings: Settings, pairs: list[TokenizedPair], *, loss: str, packed: bool):
        self.settings = settings
        self.model = build_model(settings)
        collator = PackedPreferenceCollator(PAD) if packed else PreferenceCollator(PAD)
        self.collator = collator
        self.items: list = pairs
        self.reference_s = 0.0
        if loss == "dpo":
            started = time.perf_counter()
            with autocast(settings):
                # (it moves each batch to the model's device itself)
                self.items = attach_reference_logps(
                    self.model, pairs, collator, batch_size=settings.batch_size
                )
            self.reference_s = time.perf_counter() - started
        self.module = PreferenceModule(
            self.model, method=loss, beta=0.1, sft_on_prompt=loss == "orpo", rpo_alpha=None, packed=packed
        )
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        lengths = [packed_length(p) if packed else work_tokens(p) for p in pairs]
        # packed runs use the length-grouped order MINT's run.py uses; unpacked the plain shuffle
        self.order = (
            LengthGroupedSampler(lengths, settings.batch_size, seed=settings.seed).order(0)
            if packed
            else random.Random(settings.seed).sample(range(len(pairs)), len(pairs))
        )
        self.lengths = lengths
        self.cursor = 0

    def _on_device(self, collator):
        device = self.settings.device
        if device == "cpu":
            return collator
        return lambda rows: {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(rows).items()}

    def batch(self, indices: list[int]) -> dict:
        return self._on_device(self.collator)([self.items[i] for i in indices])

    def first_batch_loss(self, indices: list[int]) -> float:
        with torch.no_grad(), autocast(self.settings):
            return self.module.compute_loss(self.batch(indices))[0].item()

    def run(self, steps: int) -> list[tuple[float, int]]:
        """(seconds, work tokens) of each step."""
        out = []
        bs = self.settings.batch_size
        for _ in range(steps):
            if self.cursor + bs > len(self.order):
                self.cursor = 0
            indices = self.order[self.cursor : self.cursor + bs]
            self.cursor += bs
            synchronize(self.settings)
            started = time.perf_counter()
            with autocast(self.settings):
                loss, _ = self.module.compute_loss(self.batch(indices))
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            synchronize(self.settings)
            out.append((time.perf_counter() - started, sum(work_tokens(self.items_pair(i)) for i in indices)))
        return out

    def items_pair(self, index: int) -> TokenizedPair:
        item = self.items[index]
        if isinstance(item, TokenizedPair):
            return item
        return TokenizedPair(item["prompt_ids"], item["chosen_ids"], item["rejected_ids"])


# --------------------------------------------------------------------------- TRL runners


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer steps (the first step of a call has no predecessor)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and args.use_cpu is False:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def _token_counting(trainer_cls: type, count: Callable[[dict], int]) -> type:
    class Counting(trainer_cls):
        tokens: list[int]

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.tokens.append(count(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


class TrlRunner:
    def __init__(self, settings: Settings, pairs: list[TokenizedPair], *, loss: str, out_dir: str):
        import datasets

        self.settings = settings
        self.model = build_model(settings)
        self.tokenizer = word_tokenizer()
        self.clock = StepClock()
        common = trl_args(
            out_dir,
            batch_size=settings.batch_size,
            learning_rate=1e-4,
            seed=settings.seed,
            device=settings.device,
            bf16=settings.dtype == "bfloat16",
            gradient_checkpointing=settings.gradient_checkpointing,
        )
        if loss == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            # ORPO's tokenizer adds BOS to the prompt and EOS to each answer itself.
            rows = [
                {
                    "prompt": text(p.prompt_ids[1:]),
                    "chosen": " " + text(p.chosen_ids[:-1]),
                    "rejected": " " + text(p.rejected_ids[:-1]),
                }
                for p in pairs
            ]
            trainer_cls = _token_counting(
                ORPOTrainer,
                lambda b: int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()),
            )
            args = ORPOConfig(**common)
        else:
            from trl import DPOConfig, DPOTrainer

            # DPO appends the EOS text to each answer; the BOS stays in the prompt text.
            rows = [
                {
                    "prompt": text(p.prompt_ids),
                    "chosen": " " + text(p.chosen_ids[:-1]),
                    "rejected": " " + text(p.rejected_ids[:-1]),
                }
                for p in pairs
            ]
            trainer_cls = _token_counting(DPOTrainer, lambda b: int(b["attention_mask"].sum()))
            args = DPOConfig(
                **common, precompute_ref_log_probs=True, precompute_ref_batch_size=settings.batch_size
            )
        started = time.perf_counter()
        self.trainer = trainer_cls(
            model=self.model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=self.tokenizer,
            callbacks=[self.clock],
        )
        self.init_s = time.perf_counter() - started
        self.trainer.tokens = []
        self._check_tokens(pairs, loss)

    def _check_tokens(self, pairs: list[TokenizedPair], loss: str) -> None:
        """`self.row_of[i]`: the TRL row of MINT's pair i, with the same token ids (checked)."""
        dataset = self.trainer.train_dataset
        if loss == "orpo":
            trl_rows, ours = orpo_token_rows(dataset, pairs)
        else:
            trl_rows = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
            ours = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
        self.row_of = trl_row_of(list(trl_rows), ours, loss)

    def first_batch_loss(self, indices: list[int]) -> float:
        return trl_batch_loss(self.trainer, [self.row_of[i] for i in indices], autocast(self.settings))

    def run(self, steps: int) -> list[tuple[float, int]]:
        self.clock.times, self.trainer.tokens = [], []
        self.trainer.args.max_steps = steps
        self.trainer.train()
        return list(zip(self.clock.times, self.trainer.tokens, strict=True))


def make_runner(method: str, settings: Settings, pairs: list[TokenizedPair], out_dir: str):
    loss = "orpo" if method.endswith("orpo") else "dpo"
    if method.startswith("trl"):
        return TrlRunner(settings, pairs, loss=loss, out_dir=out_dir)
    return MintRunner(settings, pairs, loss=loss, packed="unpacked" not in method)


# --------------------------------------------------------------------------- memory (child process)


def measure_memory(method: str, settings: Settings) -> float:
    """Peak RSS growth (MiB) over `steps_per_round` steps; the peak counter is reset first."""
    pairs = make_pairs(settings)
    with tempfile.TemporaryDirectory() as out_dir:
        runner = make_runner(method, settings, pairs, out_dir)
        perturb_lora(runner.model, settings.seed)
        runner.run(1)  # allocator warm-up: optimizer states exist from here on
        reset_peak_rss()
        before = rss_kib("VmRSS")
        runner.run(settings.steps_per_round)
        return (rss_kib("VmHWM") - before) / 1024


def memory_in_child(method: str, cli: argparse.Namespace) -> float | None:
    cmd = [sys.executable, __file__, "--memory", method, "--threads", str(cli.threads)]
    cmd += ["--quick"] * cli.quick + ["--gradient-checkpointing"] * cli.gradient_checkpointing
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_MIB "):
            return float(line.split()[1])
    print(f"memory run of {method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None


# --------------------------------------------------------------------------- main


def settings_for(cli: argparse.Namespace) -> Settings:
    if cli.quick:
        shape = dict(pairs=16, batch_size=4, prompt_len=128, answer_len=16, rounds=2, steps_per_round=2)
    elif cli.model == "llama1b":
        shape = dict(pairs=64, batch_size=8, prompt_len=512, answer_len=64, rounds=3, steps_per_round=4)
    else:
        shape = dict(pairs=96, batch_size=4, prompt_len=512, answer_len=64, rounds=3, steps_per_round=4)
    if cli.rounds:
        shape["rounds"] = cli.rounds
    return Settings(
        **shape,
        gradient_checkpointing=cli.gradient_checkpointing,
        model=cli.model,
        device=cli.device,
        dtype=cli.dtype,
    )


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script runs")
    parser.add_argument("--memory", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="for every method (TRL's default; MINT's is off)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base weights")
    parser.add_argument("--model", choices=["small", "llama1b"], default="small")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; quick 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--skip-missing-trl", action="store_true", help="without TRL installed, run MINT's methods only"
    )
    cli = parser.parse_args()
    if cli.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    settings = settings_for(cli)
    torch.set_num_threads(cli.threads)
    if cli.memory:
        print(f"PEAK_MIB {measure_memory(cli.memory, settings):.1f}")
        return
    skipped = []
    methods = list(METHODS)
    if not trl_available():
        if not cli.skip_missing_trl:
            parser.error(
                "TRL is not installed (pip install -e '.[bench]'); --skip-missing-trl runs MINT's methods only"
            )
        skipped = [m for m in methods if m.startswith("trl")]
        methods = [m for m in methods if m not in skipped]
        print(f"TRL is not installed: skipping {skipped}")

    pairs = make_pairs(settings)
    print(f"settings: {settings}; torch threads {torch.get_num_threads()}")
    print(
        f"mean per pair: prompt {statistics.mean(len(p.prompt_ids) for p in pairs):.0f}, "
        f"chosen {statistics.mean(len(p.chosen_ids) for p in pairs):.0f}, "
        f"rejected {statistics.mean(len(p.rejected_ids) for p in pairs):.0f} tokens"
    )
    lengths = [packed_length(p) for p in pairs]
    grouped = LengthGroupedSampler(lengths, settings.batch_size, seed=settings.seed).order(0)
    shuffled = random.Random(settings.seed).sample(range(len(pairs)), len(pairs))
    print(
        f"padding waste of packed rows: length-grouped {padding_waste(lengths, grouped, settings.batch_size):.1%}, "
        f"shuffled {padding_waste(lengths, shuffled, settings.batch_size):.1%}"
    )

    cuda = settings.device == "cuda"
    first = list(range(settings.batch_size))
    gpu_peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        runners = {m: make_runner(m, settings, pairs, os.path.join(out_dir, m)) for m in methods}
        for runner in runners.values():
            perturb_lora(runner.model, settings.seed)
        losses = {m: r.first_batch_loss(first) for m, r in runners.items()}
        print("first-batch loss (same pairs, same weights: base + the same perturbed LoRA B):")
        for m, value in losses.items():
            print(f"  {m:20s} {value:.7f}")
        for a, b in (
            ("mint_packed_orpo", "trl_orpo"),
            ("mint_unpacked_orpo", "trl_orpo"),
            ("mint_packed_dpo", "trl_dpo"),
        ):
            if a in losses and b in losses:
                print(f"  |{a} - {b}| = {abs(losses[a] - losses[b]):.2e}")
        if "trl_dpo" in runners:
            print(
                f"reference log-probs: MINT packed {runners['mint_packed_dpo'].reference_s:.1f} s; "
                f"TRL DPOTrainer init (tokenize + precompute) {runners['trl_dpo'].init_s:.1f} s"
            )

        steps: dict[str, list[tuple[float, int]]] = {m: [] for m in methods}
        for round_ in range(settings.rounds):
            for m, runner in runners.items():
                if cuda:
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                timed = runner.run(settings.steps_per_round)[1:]  # drop the warm-up step
                if cuda:
                    growth = (torch.cuda.max_memory_allocated() - before) / 2**20
                    gpu_peak[m] = max(gpu_peak.get(m, 0.0), growth)
                steps[m].extend(timed)
                print(f"round {round_ + 1}: {m:20s} " + " ".join(f"{s:.3f}s" for s, _ in timed), flush=True)

    rates = {m: statistics.median(tok / sec for sec, tok in steps[m]) for m in methods}
    step_s = {m: statistics.median(sec for sec, _ in steps[m]) for m in methods}
    memory = {m: (None if cli.no_memory or cuda else memory_in_child(m, cli)) for m in methods}
    mem_name = "peak GPU memory growth (MiB)" if cuda else "peak RSS growth (MiB)"
    print(f"\n| method | median step (s) | work tokens/s (median) | {mem_name} |")
    print("|---|---|---|---|")
    for m in methods:
        value = gpu_peak.get(m) if cuda else memory[m]
        mem = "n/a" if value is None else f"{value:.0f}"
        print(f"| {m} | {step_s[m]:.3f} | {rates[m]:.0f} | {mem} |")
    ratios = {}
    for name, a, b in (
        ("packed ORPO / TRL ORPO", "mint_packed_orpo", "trl_orpo"),
        ("unpacked ORPO / TRL ORPO", "mint_unpacked_orpo", "trl_orpo"),
        ("packed ORPO / unpacked ORPO", "mint_packed_orpo", "mint_unpacked_orpo"),
        ("packed DPO / TRL DPO", "mint_packed_dpo", "trl_dpo"),
    ):
        if a in rates and b in rates:
            ratios[name] = rates[a] / rates[b]
            print(f"{name}: {ratios[name]:.2f}x")
    result = {
        "settings": settings.__dict__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "losses": losses,
        "loss_diffs": {
            f"{a} - {b}": abs(losses[a] - losses[b])
            for a, b in (("mint_packed_orpo", "trl_orpo"), ("mint_packed_dpo", "trl_dpo"))
            if a in losses and b in losses
        },
        "tokens_per_s": rates,
        "step_s": step_s,
        "peak_rss_mib": None if cuda else memory,
        "peak_gpu_mib": gpu_peak if cuda else None,
        "ratios": ratios,
        "skipped": skipped,
    }
    print("JSON " + json.dumps(result))
    if cli.json is not None:
        cli.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
