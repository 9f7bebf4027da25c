"""The preference LightningModule: one module for ORPO, DPO and SFT.

Two batch layouts, chosen by `packed`:
- packed (mint.optim.packing.PackedPreferenceCollator): one row [prompt, chosen,
  rejected] per pair, the prompt encoded once (see mint/optim/packing.py);
- unpacked (mint.data.PreferenceCollator): chosen and rejected sequences padded to
  one length and run as a single forward of 2B rows. Labels are -100 on prompt and
  padding, so answer log-probs never include prompt tokens.
Both give the same log-probs (tests/test_packing.py), so the losses below are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from mint.config import Loss
from mint.optim.losses import dpo_loss, orpo_loss
from mint.optim.packing import packed_logps


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label token given its prefix, 0 where the label is -100.

    logits [N, T, V] predict the token at t+1 from position t; labels [N, T].
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    logps = -F.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none"
    )
    return logps  # [N, T-1], zeros at ignored positions


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-prob per row and the number of answer tokens per row."""
    logps = token_logps(logits, labels)
    n_tokens = (labels[:, 1:] != -100).sum(-1)
    return logps.sum(-1), n_tokens


def nll_from(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-averaged negative log-likelihood over the positions that carry a label."""
    logps = token_logps(logits, labels)
    return -logps.sum() / (labels[:, 1:] != -100).sum().clamp(min=1)


def sft_labels(batch: dict[str, torch.Tensor], on_prompt: bool) -> torch.Tensor:
    """Targets of the NLL term: the chosen answer, or prompt + chosen (TRL's ORPO)."""
    if not on_prompt:
        return batch["chosen_labels"]
    ids = batch["chosen_input_ids"]
    return torch.where(batch["chosen_attention_mask"].bool(), ids, torch.full_like(ids, -100))


class PreferenceModule(L.LightningModule):
    """Aligns `model` (usually a PEFT model) on preference batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        loss: Loss | str,
        beta: float = 0.1,
        rpo_alpha: float | None = None,
        sft_on_prompt: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.1,
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_name = Loss(loss)
        self.beta = beta
        self.rpo_alpha = rpo_alpha
        self.sft_on_prompt = sft_on_prompt
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.warmup_ratio = warmup_ratio
        self.packed = packed
        # Checkpoints keep only trainable weights (see on_save_checkpoint), so
        # loading one must not demand the frozen base weights.
        self.strict_loading = False

    # --- forward -----------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _answer_logps(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen/rejected summed answer log-probs, their token counts, and the SFT-term NLL."""
        if self.packed:
            out = packed_logps(self.model, batch, sft_on_prompt=self.sft_on_prompt)
            return out.chosen_sum, out.rejected_sum, out.chosen_count, out.rejected_count, out.nll
        batch_size = batch["chosen_input_ids"].shape[0]
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logits = self._forward(input_ids, attention_mask)
        sums, counts = answer_logps(logits, labels)
        nll = nll_from(logits[:batch_size], sft_labels(batch, self.sft_on_prompt))
        return sums[:batch_size], sums[batch_size:], counts[:batch_size], counts[batch_size:], nll

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.loss_name is Loss.sft and self.training and not self.packed:
            # SFT training needs only the chosen rows; its validation compares both.
            # (Packed rows hold both answers; the rejected tail costs little next to the prompt.)
            logits = self._forward(batch["chosen_input_ids"], batch["chosen_attention_mask"])
            nll = nll_from(logits, sft_labels(batch, self.sft_on_prompt))
            chosen_sum, chosen_n = answer_logps(logits, batch["chosen_labels"])
            return nll, {"nll_loss": nll.detach(), "logps/chosen": (chosen_sum / chosen_n).mean().detach()}

        chosen_sum, rejected_sum, chosen_n, rejected_n, nll = self._answer_logps(batch)
        chosen_mean, rejected_mean = chosen_sum / chosen_n, rejected_sum / rejected_n
        if self.loss_name is Loss.sft and self.training:
            return nll, {"nll_loss": nll.detach(), "logps/chosen": chosen_mean.mean().detach()}

        if self.loss_name is Loss.orpo:
            return orpo_loss(chosen_mean, rejected_mean, nll, self.beta)
        if self.loss_name is Loss.dpo:
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
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, on_epoch=True)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=batch_size, on_epoch=True)

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the trainable weights only: a 3B base would otherwise be copied
        # into every checkpoint although it never changes.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
