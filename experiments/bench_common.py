"""What the preference benchmarks share (bench_preference.py, bench_pretrained.py).

The same adapter weights in every model compared, the work-equivalent token count, peak RSS read
from /proc, and the TRL side: its common training arguments, the check that TRL trains on exactly
MINT's token ids, and its loss on a given batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mint.pairs.text import TokenizedPair


@torch.no_grad()
def perturb_lora(model: torch.nn.Module, seed: int) -> None:
    """Give the trained adapter's LoRA B matrices the same random values in every model (they start at zero).

    Called after the reference log-probs are computed, so the DPO policy differs from its
    reference and the first-batch loss check is not the trivial log 2 of policy == reference.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        # Only the trained adapter: TRL's DPOTrainer adds a frozen copy named "ref" as its reference.
        if ".lora_B.default." in name:
            param.copy_(0.02 * torch.randn(param.shape, generator=generator).to(param.device))


def work_tokens(pair: TokenizedPair) -> int:
    """Tokens an unpacked forward runs for one pair (the prompt twice), so that packing is not
    credited with tokens it skips."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


# --------------------------------------------------------------------------- memory


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (now) or VmHWM (the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux), so that the next peak is one phase's own."""
    Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------- TRL


def trl_args(
    out_dir: str,
    *,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str = "cpu",
    bf16: bool = False,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of ORPOConfig / DPOConfig that both benchmarks set alike: no logging,
    saving or progress bars, nothing truncated, a constant learning rate, AdamW as MINT uses."""
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_length=4096,  # nothing is truncated: the same tokens as MINT
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        bf16=bf16,  # TRL turns bf16 on where it can: only when MINT's is
        fp16=False,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        beta=0.1,
    )


def orpo_token_rows(dataset: Any, pairs: Sequence[TokenizedPair]) -> tuple[list, list]:
    """(TRL's, MINT's) token rows of an ORPO dataset: prompt+chosen and prompt+rejected per pair."""
    trl_rows = list(zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True))
    ours = [(p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids) for p in pairs]
    return trl_rows, ours


def trl_row_of(trl_rows: Sequence[Sequence], ours: Sequence[Sequence], what: str) -> list[int]:
    """For each of MINT's rows, the index of the TRL row with the same token ids.

    TRL must train on exactly MINT's token ids, or the comparison means nothing; it may reorder
    its dataset (the DPO precompute does), so rows are matched by content.
    """
    where = {tuple(map(tuple, row)): index for index, row in enumerate(trl_rows)}
    missing = [i for i, row in enumerate(ours) if tuple(map(tuple, row)) not in where]
    assert not missing, f"TRL's {what} tokens differ from MINT's for pairs {missing[:5]}"
    return [where[tuple(map(tuple, row))] for row in ours]


def trl_batch_loss(trainer: Any, rows: Sequence[int], autocast: Any = None) -> float:
    """The trainer's `compute_loss` on its dataset rows `rows`, collated as its training collates."""
    batch = [trainer.train_dataset[i] for i in rows]
    inputs = trainer._prepare_inputs(trainer.data_collator(batch))
    with torch.no_grad(), autocast or contextlib.nullcontext():
        return trainer.compute_loss(trainer.model, inputs).item()
