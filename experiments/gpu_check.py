"""GPU check: a few ORPO steps on a Llama-3.2-3B-shaped student, bf16 and 4-bit, through MINT's code.

The model is built from a `LlamaConfig` with Llama-3.2-3B's dimensions and random weights
(nothing is downloaded), saved once, then loaded per mode with MINT's own loader
(`mint.student.load_student`: dtype, bitsandbytes quantization, gradient checkpointing,
LoRA r=256 / alpha 128 / dropout 0.05 on all linear layers, as the paper) and trained for a
few steps with MINT's packed ORPO forward (`PreferenceModule.compute_loss` on
`PackedPreferenceCollator` batches), bf16 autocast and grad-norm clipping at 0.3 as
`trainer=gpu` does, AdamW on the LoRA weights. Data are random token ids in MINT's
rare-disease shape (long prompt, two short answers).

Modes: `bf16` (bf16 base + LoRA) and `nf4` (4-bit NF4 base with double quantisation, bf16
compute, + LoRA: QLoRA). Per mode it prints step time, tokens/s (packed tokens: prompt +
chosen + rejected per pair) and the peak GPU memory allocated by PyTorch.

    experiments/gpu_check.sh                               # on a CUDA machine
    .venv/bin/python experiments/gpu_check.py --tiny       # CPU dry run of the same code path

Without CUDA it refuses (exit 2) unless `--tiny`: tiny dimensions, float32 base, both modes
on the CPU (bitsandbytes 0.50 runs NF4 and its backward on the CPU), no timing claims.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from mint.optim.module import PreferenceModule  # noqa: E402
from mint.pairs.packed import PackedPreferenceCollator, packed_length  # noqa: E402
from mint.pairs.text import TokenizedPair  # noqa: E402
from mint.student import load_student  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
MODES = ("bf16", "nf4")
# Llama-3.2-3B(-Instruct)'s config.json dimensions: 3.21e9 parameters, tied embeddings.
LLAMA32_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
)
# The same code path at toy size (intermediate a multiple of 32: bitsandbytes' CPU 4-bit kernel).
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class Shape:
    batch_size: int
    prompt_len: int
    answer_len: int
    steps: int  # timed steps
    warmup: int  # untimed first steps (allocator, kernels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy dimensions, float32, CPU allowed (a dry run)")
    p.add_argument("--modes", default="bf16,nf4", help="comma-separated subset of: " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 8, the paper's)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 640)")
    p.add_argument("--answer-len", type=int, default=None, help="tokens per answer (default 160)")
    p.add_argument("--lora-r", type=int, default=256)
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(the paper: on)",
    )
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa | eager | flex_attention")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {sorted(unknown)}; expected a subset of {list(MODES)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: expected at least 1 timed step")
    return args


def shape_for(args: argparse.Namespace) -> Shape:
    tiny = args.tiny
    return Shape(
        batch_size=args.batch_size or (2 if tiny else 8),
        prompt_len=args.prompt_len or (48 if tiny else 640),
        answer_len=args.answer_len or (16 if tiny else 160),
        steps=args.steps if args.steps is not None else (2 if tiny else 10),
        warmup=args.warmup if args.warmup is not None else (1 if tiny else 2),
    )


def save_random_llama(out_dir: Path, dims: dict, dtype: torch.dtype, device: str) -> Path:
    """A random-init Llama of `dims` plus a small word-level tokenizer with a chat template, as a
    folder MINT's loader reads like any downloaded model."""
    config = LlamaConfig(**dims, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 3B init on the CPU takes minutes
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    del model
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {f"w{i}": i for i in range(3, 64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(out_dir)
    return out_dir


def random_batches(shape: Shape, vocab_size: int, n_batches: int, seed: int = 0) -> list[list[TokenizedPair]]:
    """Pairs shaped like MINT's rare-disease pairs: a long prompt (±10%), two answers (±20%)
    sharing a 4-token header (`POTENTIAL_DISEASES:`)."""
    rng = random.Random(seed)

    def ids(mean: int, spread: float) -> list[int]:
        n = rng.randint(max(1, int(mean * (1 - spread))), int(mean * (1 + spread)))
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    batches = []
    for _ in range(n_batches):
        batch = []
        for _ in range(shape.batch_size):
            header = ids(4, 0.0)
            batch.append(
                TokenizedPair(
                    [BOS] + ids(shape.prompt_len - 1, 0.1),
                    header + ids(shape.answer_len - 5, 0.2) + [EOS],
                    header + ids(shape.answer_len - 5, 0.2) + [EOS],
                )
            )
        batches.append(batch)
    return batches


def run_mode(
    mode: str, folder: Path, cache_dir: Path, args: argparse.Namespace, shape: Shape, device: str
) -> dict:
    cuda = device == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        if mode == "nf4"
        else None
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, _ = load_student(
        str(folder),
        cache_dir=str(cache_dir),
        dtype="bfloat16" if cuda else "float32",
        quantization=quantization,
        lora=LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_r // 2, lora_dropout=0.05, target_modules="all-linear"
        ),
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn,
    )
    if quantization is None:  # a 4-bit model is already there: bitsandbytes loads it onto the current GPU
        model.to(device)
    module = PreferenceModule(model, method="orpo", beta=0.1, packed=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    collator = PackedPreferenceCollator(PAD)
    batches = random_batches(shape, model.config.vocab_size, shape.warmup + shape.steps)

    times, tokens, losses = [], [], []
    for i, pairs in enumerate(batches):
        batch = {k: v.to(device) for k, v in collator(pairs).items()}
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        # bf16 autocast on the GPU, as Lightning's bf16-mixed precision (trainer=gpu)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = module.compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{mode}: non-finite loss {loss.item()} at step {i}")
        losses.append(loss.item())
        if i >= shape.warmup:
            times.append(time.perf_counter() - started)
            tokens.append(sum(packed_length(p) for p in pairs))
    result = {
        "mode": mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "parameters": model.num_parameters(),
        "trainable": model.num_parameters(only_trainable=True),
        "base_dtype": "nf4" if quantization is not None else str(next(model.parameters()).dtype),
        # proof that the base really is 4-bit: bitsandbytes' layers replaced the linear layers
        "linear4bit_layers": sum(
            type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
            for m in model.modules()
        ),
        "step_s": sum(times) / len(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    del module, model, optimizer
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False). This check needs a "
            "GPU; `--tiny` runs the same code path at toy size on the CPU.",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if cuda else "cpu"
    shape = shape_for(args)
    dims = TINY if args.tiny else LLAMA32_3B
    print(
        f"gpu_check: {'tiny' if args.tiny else 'Llama-3.2-3B-shaped'} model on {device}; batch "
        f"{shape.batch_size} pairs x (prompt ~{shape.prompt_len} + 2 answers ~{shape.answer_len}) tokens; "
        f"LoRA r={args.lora_r}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"attn {args.attn}; {shape.warmup} warm-up + {shape.steps} timed steps per mode",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="mint-gpu-check-") as tmp:
        started = time.perf_counter()
        folder = save_random_llama(
            Path(tmp) / "model", dims, torch.bfloat16 if cuda else torch.float32, device
        )
        print(f"built and saved the random model in {time.perf_counter() - started:.0f} s", flush=True)
        for mode in args.modes.split(","):
            result = run_mode(mode, folder, Path(tmp) / "cache", args, shape, device)
            results.append(result)
            mem = f"{result['peak_gpu_mem_gib']:.1f} GiB" if result["peak_gpu_mem_gib"] is not None else "n/a"
            print(
                f"{mode:>5} ({result['base_dtype']} base): {result['parameters'] / 1e6:.1f}M parameters ({result['trainable'] / 1e6:.1f}M "
                f"trainable, {result['linear4bit_layers']} 4-bit linear layers), {result['step_s']:.3f} s/step, {result['tokens_per_s']:.0f} tokens/s, "
                f"peak GPU memory {mem}, loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}",
                flush=True,
            )
            if cuda:
                torch.cuda.empty_cache()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
