"""The preference LightningModule: one module for ORPO, DPO and SFT.

Two batch layouts, chosen by `packed` (mint/optim/forward.py runs both):
- packed (mint.pairs.packed, and mint.pairs.vision's PackedVisionCollator for images): one row
  [prompt, chosen, rejected] per pair, the prompt encoded once;
- unpacked (mint.pairs.text, mint.pairs.vision): chosen and rejected sequences padded to one
  length and run as one forward of 2B rows by `forward`, the student kind's hook (an image
  student encodes each image once there). Labels are -100 on prompt and padding, so answer
  log-probs never include prompt tokens.
Both give the same log-probs (tests/test_packing.py), so the losses below are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from mint.config import Method
from mint.optim.forward import (
    SIDES,
    SidesForward,
    packed_logps,
    sides_logps,
    text_sides_logits,
    without_rejected,
)
from mint.optim.losses import dpo_loss, orpo_loss

# Precisions whose compute runs in 16 bits under autocast while the optimizer steps the weights.
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")


class PreferenceModule(L.LightningModule):
    """Aligns `model` (usually a PEFT model) on preference batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        method: Method | str,
        beta: float = 0.1,
        rpo_alpha: float | None = None,
        sft_on_prompt: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.1,
        packed: bool = False,
        forward: SidesForward = text_sides_logits,
    ) -> None:
        super().__init__()
        self.model = model
        self.method = Method(method)
        self.beta = beta
        self.rpo_alpha = rpo_alpha
        self.sft_on_prompt = sft_on_prompt
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.warmup_ratio = warmup_ratio
        self.packed = packed
        self.forward_sides = forward
        self._fit_dtypes: list[tuple[torch.nn.Parameter, torch.dtype]] = []
        # Checkpoints keep only trainable weights (see on_save_checkpoint), so
        # loading one must not demand the frozen base weights.
        self.strict_loading = False

    # --- forward -----------------------------------------------------------------
    def _answer_logps(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen/rejected summed answer log-probs, their token counts, and the SFT-term NLL."""
        if self.packed:
            out = packed_logps(self.model, batch, sft_on_prompt=self.sft_on_prompt)
            return out.chosen_sum, out.rejected_sum, out.chosen_count, out.rejected_count, out.nll
        batch_size = batch["chosen_input_ids"].shape[0]
        sums, counts, nll = sides_logps(self.model, batch, self.forward_sides, SIDES, self.sft_on_prompt)
        return sums[:batch_size], sums[batch_size:], counts[:batch_size], counts[batch_size:], nll

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.method is Method.sft and self.training:
            # SFT training needs only the chosen answers (its validation compares both): the chosen
            # rows of an unpacked batch, the [prompt, chosen] part of a packed one.
            if self.packed:
                out = packed_logps(self.model, without_rejected(batch), sft_on_prompt=self.sft_on_prompt)
                chosen_sum, chosen_n, nll = out.chosen_sum, out.chosen_count, out.nll
            else:
                chosen_sum, chosen_n, nll = sides_logps(
                    self.model, batch, self.forward_sides, ("chosen",), self.sft_on_prompt
                )
            return nll, {"nll_loss": nll.detach(), "logps/chosen": (chosen_sum / chosen_n).mean().detach()}

        chosen_sum, rejected_sum, chosen_n, rejected_n, nll = self._answer_logps(batch)
        chosen_mean, rejected_mean = chosen_sum / chosen_n, rejected_sum / rejected_n

        if self.method is Method.orpo:
            return orpo_loss(chosen_mean, rejected_mean, nll, self.beta)
        if self.method is Method.dpo:
            loss, metrics = dpo_loss(
                chosen_sum, rejected_sum, batch["ref_chosen_logps"], batch["ref_rejected_logps"], self.beta
            )
            metrics["nll_loss"] = nll.detach()
            if self.rpo_alpha:
                loss = loss + self.rpo_alpha * nll
            return loss, metrics
        # sft / none on held-out pairs: the method's loss is the NLL; report whether
        # the chosen answer is more likely (per token) than the rejected one.
        metrics = {
            "nll_loss": nll.detach(),
            "logps/chosen": chosen_mean.mean().detach(),
            "logps/rejected": rejected_mean.mean().detach(),
            "rewards/accuracies": (chosen_mean > rejected_mean).float().mean().detach(),
            "rewards/margins": (chosen_mean - rejected_mean).mean().detach(),
        }
        return nll, metrics

    # --- Lightning hooks ---------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch)
        if not torch.isfinite(loss):
            # Raised before backward: the weights are still those of the last finite step.
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; "
                "lower optim.optimizer.lr or check the data. The last checkpoint is kept."
            )
        batch_size = len(batch["prompt_lengths"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=batch_size)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        batch_size = len(batch["prompt_lengths"])
        # sync_dist: under DDP each process sees a share of the pairs; the logged value is their mean
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, on_epoch=True, sync_dist=True)
        self.log_dict(
            {f"val/{k}": v for k, v in metrics.items()}, batch_size=batch_size, on_epoch=True, sync_dist=True
        )

    def setup(self, stage: str) -> None:
        # Mixed precision computes in 16 bits but keeps the trained weights in float32. PEFT does
        # so for LoRA's own weights; modules trained in full (`modules_to_save`) keep the base's
        # dtype, and in bfloat16 (8 bits of mantissa) an AdamW step of 5e-4 on a weight near 1
        # rounds to no change: the SmolLM2 vision student's gates stayed at exactly 1.0 for 100
        # steps. Here, before a checkpoint is restored and the optimizer is built, so both see
        # float32; `on_fit_end` casts back for evaluation, which runs without autocast. FSDP
        # applies its own mixed-precision policy to the weights it shards.
        if stage != "fit" or self.trainer.precision not in MIXED_PRECISIONS:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            return
        self._fit_dtypes = [
            (p, p.dtype)
            for p in self.model.parameters()
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
        ]
        for p, _ in self._fit_dtypes:
            p.data = p.data.float()

    def on_fit_end(self) -> None:
        for p, dtype in self._fit_dtypes:
            p.data = p.data.to(dtype)
        self._fit_dtypes = []

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("optim.optimizer is null: nothing to train with (optim=none only evaluates)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters: set student.lora (or an adapter)")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(
            optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = {name: p.grad for name, p in self.named_parameters() if p.grad is not None}
        self.log_grad_norm(list(grads.values()))
        # A finite loss can still give an inf/NaN gradient (an overflow in backward); one such
        # step turns every weight NaN and the next checkpoint would keep them. Stop first.
        # fp16 mixed precision is the exception: its GradScaler skips those steps by design.
        if self.trainer.precision == "16-mixed":
            return
        if not grads or torch.stack([torch.isfinite(g).all() for g in grads.values()]).all():
            return  # one device sync per step, not one per parameter
        bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
        raise FloatingPointError(
            f"non-finite gradient at step {self.global_step} in {len(bad)} parameter(s), e.g. "
            f"{bad[0]}; lower optim.optimizer.lr or check the data. The weights were not "
            "updated and the last checkpoint is kept."
        )

    def log_grad_norm(self, grads: list[torch.Tensor]) -> None:
        """`train/grad_norm`: the total L2 norm of the trainable weights' gradients, before clipping
        (Lightning clips after this hook; fp16 gradients are unscaled by then), over all gradient
        accumulation steps of the optimizer step. Under FSDP each process holds a shard of every
        gradient: their squared norms are summed across processes."""
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            norm = self.trainer.strategy.reduce(norm.pow(2), reduce_op="sum").sqrt()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the trainable weights only: a 3B base would otherwise be copied
        # into every checkpoint although it never changes.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # Never replace a good checkpoint with broken weights (Lightning calls this hook before
        # it writes the file, so raising here leaves the previous checkpoint as it was).
        broken = [
            k
            for k, v in checkpoint["state_dict"].items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if broken:
            raise FloatingPointError(
                f"refusing to checkpoint non-finite weights at step {self.global_step} "
                f"({len(broken)} tensor(s), e.g. {broken[0]}); the last checkpoint is kept"
            )
