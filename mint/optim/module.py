"""The preference LightningModule: one module for ORPO, DPO and SFT.

Two batch layouts, chosen by `packed`:
- packed (mint.optim.packing.PackedPreferenceCollator): one row [prompt, chosen,
  rejected] per pair, the prompt encoded once (see mint/optim/packing.py);
- unpacked (mint.data.PreferenceCollator): chosen and rejected sequences padded to
  one length and run as a single forward of 2B rows. Labels are -100 on prompt and
  padding, so answer log-probs never include prompt tokens.
Both give the same log-probs (tests/test_packing.py), so the losses below are shared.

Vision students (mint.student.vision) train on the unpacked layout only: a
VisionPreferenceCollator batch adds `pixel_values`, `aspect_ratio_ids`, `aspect_ratio_mask`
and one `cross_attention_mask` shared by both sides; `sides_logits` encodes each image once
and reuses it for the chosen and the rejected rows.
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
from mint.student.vision import image_states

# The keys a VisionPreferenceCollator batch adds to the text batch.
IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


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


def sft_labels(
    batch: dict[str, torch.Tensor], on_prompt: bool, vocab_size: int | None = None
) -> torch.Tensor:
    """Targets of the NLL term: the chosen answer, or prompt + chosen (TRL's ORPO).

    With `on_prompt`, ids at or past `vocab_size` (the logits' last dim) are no targets: Mllama's
    `<|image|>` token has an input embedding but no output logit, so it cannot be predicted.
    """
    if not on_prompt:
        return batch["chosen_labels"]
    ids = batch["chosen_input_ids"]
    keep = batch["chosen_attention_mask"].bool()
    if vocab_size is not None:
        keep &= ids < vocab_size
    return torch.where(keep, ids, torch.full_like(ids, -100))


def has_images(batch: dict[str, torch.Tensor]) -> bool:
    """Whether `batch` comes from a VisionPreferenceCollator."""
    return "pixel_values" in batch


def sides_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], sides: tuple[str, ...] = ("chosen", "rejected")
) -> torch.Tensor:
    """Logits of the given sides of an unpacked batch, concatenated along the batch dim in that order.

    Text batches run as they always have. Image batches encode each image once (vision tower +
    projector, `image_states`) and repeat the states and the shared cross-attention mask for
    every side: the sides share the prompt and so the image.
    """
    input_ids = torch.cat([batch[f"{side}_input_ids"] for side in sides])
    attention_mask = torch.cat([batch[f"{side}_attention_mask"] for side in sides])
    if not has_images(batch):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    missing = [key for key in IMAGE_KEYS if key not in batch]
    if missing:
        raise ValueError(
            f"an image batch (it has pixel_values) lacks {missing}; use VisionPreferenceCollator"
        )
    states = image_states(model, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    # states hold images*tiles rows per pair, in batch order; the model groups them back by row.
    n = len(sides)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cross_attention_states=states.repeat(n, 1, 1),
        cross_attention_mask=batch["cross_attention_mask"].repeat(n, 1, 1, 1),
        use_cache=False,
    ).logits


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
    def _answer_logps(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen/rejected summed answer log-probs, their token counts, and the SFT-term NLL."""
        if self.packed:
            out = packed_logps(self.model, batch, sft_on_prompt=self.sft_on_prompt)
            return out.chosen_sum, out.rejected_sum, out.chosen_count, out.rejected_count, out.nll
        batch_size = batch["chosen_input_ids"].shape[0]
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logits = sides_logits(self.model, batch)
        sums, counts = answer_logps(logits, labels)
        nll = nll_from(logits[:batch_size], sft_labels(batch, self.sft_on_prompt, logits.shape[-1]))
        return sums[:batch_size], sums[batch_size:], counts[:batch_size], counts[batch_size:], nll

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.packed and has_images(batch):
            # The packed row [prompt, chosen, rejected] would need a cross-attention mask in
            # packed layout and a per-segment image; not built yet.
            raise ValueError(
                "optim.packed=true does not support image inputs (vision students); "
                "use the unpacked VisionPreferenceCollator batches (optim.packed=false)"
            )
        if self.loss_name is Loss.sft and self.training and not self.packed:
            # SFT training needs only the chosen rows; its validation compares both.
            # (Packed rows hold both answers; the rejected tail costs little next to the prompt.)
            logits = sides_logits(self.model, batch, ("chosen",))
            nll = nll_from(logits, sft_labels(batch, self.sft_on_prompt, logits.shape[-1]))
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
        # A finite loss can still give an inf/NaN gradient (an overflow in backward); one such
        # step turns every weight NaN and the next checkpoint would keep them. Stop first.
        # fp16 mixed precision is the exception: its GradScaler skips those steps by design.
        if self.trainer.precision == "16-mixed":
            return
        grads = {name: p.grad for name, p in self.named_parameters() if p.grad is not None}
        if not grads or torch.stack([torch.isfinite(g).all() for g in grads.values()]).all():
            return  # one device sync per step, not one per parameter
        bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
        raise FloatingPointError(
            f"non-finite gradient at step {self.global_step} in {len(bad)} parameter(s), e.g. "
            f"{bad[0]}; lower optim.optimizer.lr or check the data. The weights were not "
            "updated and the last checkpoint is kept."
        )

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
