"""Vision-language teachers for the tissue task: a CLIP-style model trained here, or a CLIP checkpoint.

- `ClipTeacher`: a timm CNN image tower and the frozen all-MiniLM-L6-v2 text tower, each with
  a trainable projection into one embedding space. Trained with symmetric InfoNCE between each
  image and its own morphology description (learned temperature) plus cross-entropy over the
  image's similarity to one text prompt per tissue.
- `PlipTeacher`: any CLIP-format checkpoint (PLIP: vinid/plip) from a local folder, loaded with
  transformers' `CLIPModel`; zero-shot, or fine-tuned with the same two losses.

Both predict a tissue from the image alone: logits are the image's similarity to the tissue
prompts. The descriptions are training signal only, which is what makes the teacher
multimodal while the student sees the image only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPModel, CLIPProcessor

from mint.data.task_data import Sample, TaskData
from mint.sentence_encoder import default_model_dir, embed_frozen
from mint.teacher.crossfit import DictDataset, TeacherModule, adamw_cosine, load_state_dict
from mint.teacher.fusion import image_tensor

PROMPT_TEMPLATE = "An H&E image of {label} tissue nuclei."
# CLIP's cap on the learned logit scale (1/temperature): beyond it training turns unstable.
MAX_LOGIT_SCALE = 100.0


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image [B, D] and text [B, D] embeddings.

    `same` [B, B] marks pairs whose descriptions are identical: the simulated wording repeats,
    so another image may carry exactly this text. Those count as positives (targets spread over
    them) instead of being pushed apart as false negatives.
    """
    logits = scale * image @ text.T
    targets = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


def augment_images(images: torch.Tensor) -> torch.Tensor:
    """Random flips and quarter turns per batch: a nucleus patch has no preferred orientation."""
    if torch.rand(()) < 0.5:
        images = images.flip(-1)
    return torch.rot90(images, int(torch.randint(4, ())), dims=(-2, -1))


class ClipTeacher(TeacherModule):
    def __init__(
        self,
        *,
        labels: Sequence[str],
        image_backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        image_size: int = 64,
        embed_dim: int = 128,
        text_model_dir: str | None = None,
        text_max_length: int = 128,
        embed_cache_dir: str | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
        contrastive_weight: float = 1.0,
        class_weight: float = 1.0,
        head: bool = False,
        temperature: float = 0.07,
        augment: bool = True,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        init_from: str | None = None,
        finetune: bool = True,
    ) -> None:
        """`backbone_kwargs` go to timm.create_model (e.g. `channels` to narrow a ResNet for CPUs).

        `contrastive_weight=0` drops the descriptions entirely: the image-only baseline.
        `temperature` is the initial value of the learned one.
        `init_from`: a checkpoint of the same architecture to start from (the pretrained tower of
        mint.teacher.pretrain); `finetune=False` then uses it zero-shot, untrained.
        """
        super().__init__()
        if contrastive_weight < 0 or class_weight < 0 or contrastive_weight + class_weight == 0:
            raise ValueError(
                f"contrastive_weight={contrastive_weight} and class_weight={class_weight} must be >= 0, "
                "not both 0"
            )
        if head and class_weight == 0:
            raise ValueError("head=True needs class_weight > 0: only the class loss trains the head")
        self.save_hyperparameters()
        self.text_model_dir = str(text_model_dir or default_model_dir())
        # pretrained=False: the machines are offline; num_classes=0 leaves pooled features.
        self.cnn = timm.create_model(
            image_backbone, pretrained=False, num_classes=0, **(backbone_kwargs or {})
        )
        self.image_proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.cnn.num_features, embed_dim))
        # The frozen tower runs once (make_dataset, and here for the prompts); only this projection trains.
        text_dim = AutoConfig.from_pretrained(self.text_model_dir).hidden_size
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, text_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(text_dim, embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))
        self.classifier = nn.Linear(self.cnn.num_features, len(labels)) if head else None
        prompts = [prompt_template.format(label=label) for label in labels]
        # Not persistent: a function of the config, recomputed (memoised) rather than restored.
        self.register_buffer(
            "prompt_emb",
            embed_frozen(prompts, self.text_model_dir, text_max_length, progress=False),
            persistent=False,
        )
        if init_from is not None:
            self.load_state_dict(load_state_dict(Path(init_from)))
        elif not finetune:
            raise ValueError("finetune=False (zero-shot) needs init_from: a random tower knows nothing")
        self.requires_grad_(finetune)

    def make_dataset(self, samples: Sequence[Sample]) -> DictDataset:
        hp = self.hparams
        missing = [s.id for s in samples if s.image is None]
        if missing:
            raise ValueError(f"ClipTeacher needs an `image` on every sample; missing on {missing[:5]}")
        columns: dict[str, Any] = {
            "label": torch.tensor([s.label for s in samples], dtype=torch.long),
            "image": torch.stack([image_tensor(s.image, hp.image_size) for s in samples]),
        }
        if hp.contrastive_weight > 0:
            columns["text_emb"] = embed_frozen(
                [s.text for s in samples],
                self.text_model_dir,
                hp.text_max_length,
                cache_dir=hp.embed_cache_dir,
            )
        return DictDataset(columns)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_emb), dim=-1)

    def _logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CNN features -> (normalised image embedding, label logits)."""
        image = F.normalize(self.image_proj(features), dim=-1)
        logits = self.scale() * image @ self.encode_text(self.prompt_emb).T
        if self.classifier is not None:
            logits = logits + self.classifier(features)
        return image, logits

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Label logits [B, C] from `batch["image"]` alone."""
        return self._logits(self.cnn(batch["image"]))[1]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        hp = self.hparams
        if not hp.finetune:
            return None  # zero-shot: nothing to train; Lightning skips the step
        images = augment_images(batch["image"]) if hp.augment else batch["image"]
        image, logits = self._logits(self.cnn(images))
        labels = batch["label"]
        n = len(labels)
        class_loss = F.cross_entropy(logits, labels)
        loss = hp.class_weight * class_loss
        if hp.contrastive_weight > 0:
            text_emb = batch["text_emb"]
            # Exact equality: a text's frozen embedding is memoised, so repeats are bit-identical
            # (cdist is not: its matmul form leaves ~1e-4 on the diagonal).
            same = (text_emb[:, None, :] == text_emb[None, :, :]).all(-1)
            contrastive = contrastive_loss(image, self.encode_text(text_emb), self.scale(), same)
            loss = loss + hp.contrastive_weight * contrastive
            self.log("train/contrastive", contrastive, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/class", class_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any] | None:
        if not self.hparams.finetune:
            return None  # zero-shot: Lightning runs the (empty) fit without an optimizer
        return adamw_cosine(self, self.parameters(), self.hparams.lr, self.hparams.weight_decay)


def clip_teacher(task: TaskData, **kwargs: Any) -> ClipTeacher:
    """`make_teacher` for fit_teacher (Hydra: `_target_` this with `_partial_: true`)."""
    return ClipTeacher(labels=list(task.labels), **kwargs)


# --------------------------------------------------------------------------- CLIP checkpoints


def load_clip(model_path: str | Path) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP-format checkpoint (model + processor) from a local folder, or an error naming the key."""
    path = Path(model_path).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"teacher.model.model_path={str(model_path)!r}: no CLIP checkpoint there (no config.json). "
            "Point it at a local copy of a CLIP-format model, e.g. PLIP (vinid/plip) saved with save_pretrained."
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"teacher.model.model_path={str(model_path)!r} holds a {model_type!r} model, not a CLIP checkpoint "
            "(config.json model_type must be 'clip')"
        )
    try:
        processor = CLIPProcessor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"teacher.model.model_path={str(model_path)!r}: cannot load its CLIP processor "
            f"(tokenizer + image processor): {error}"
        ) from error
    return CLIPModel.from_pretrained(str(path)), processor


class PlipTeacher(TeacherModule):
    def __init__(
        self,
        *,
        labels: Sequence[str],
        model_path: str,
        finetune: bool = False,
        prompt_template: str = PROMPT_TEMPLATE,
        contrastive_weight: float = 1.0,
        class_weight: float = 1.0,
        text_max_length: int = 77,
        augment: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
    ) -> None:
        """Zero-shot (`finetune=False`) or fine-tuned CLIP checkpoint at `model_path`.

        Zero-shot, the weights are frozen, so image embeddings are computed once in make_dataset
        and every fit of the stage is a no-op; early stopping ends it after `patience` epochs.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model, self.processor = load_clip(model_path)
        self.model.requires_grad_(finetune)
        # transformers 5 returns models in eval mode; a fine-tuned one needs dropout back on.
        self.model.train(finetune)
        tokens = self._tokenize([prompt_template.format(label=label) for label in labels])
        self.register_buffer("prompt_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("prompt_mask", tokens["attention_mask"], persistent=False)
        # Frozen, the prompt embeddings are fixed: encode them once rather than on every batch.
        frozen_prompts = None
        if not finetune:
            with torch.inference_mode():
                frozen_prompts = self._text_features(self.prompt_ids, self.prompt_mask).clone()
        self.register_buffer("frozen_prompts", frozen_prompts, persistent=False)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # Fixed-length padding so rows of different batches collate into one tensor.
        length = min(self.hparams.text_max_length, self.model.config.text_config.max_position_embeddings)
        return self.processor.tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(out.pooler_output, dim=-1)

    def make_dataset(self, samples: Sequence[Sample]) -> DictDataset:
        hp = self.hparams
        missing = [s.id for s in samples if s.image is None]
        if missing:
            raise ValueError(f"PlipTeacher needs an `image` on every sample; missing on {missing[:5]}")
        pixels = self.processor.image_processor(
            images=[np.asarray(s.image) for s in samples], return_tensors="pt"
        )["pixel_values"]
        columns: dict[str, Any] = {"label": torch.tensor([s.label for s in samples], dtype=torch.long)}
        if not hp.finetune:
            # Frozen weights are part of the config (model_path), so this stays config-only.
            with torch.inference_mode():
                columns["image_emb"] = torch.cat(
                    [self._image_features(chunk) for chunk in pixels.split(64)]
                ).clone()
            return DictDataset(columns)
        columns["pixel_values"] = pixels
        if hp.contrastive_weight > 0:
            tokens = self._tokenize([s.text for s in samples])
            columns["input_ids"] = tokens["input_ids"]
            columns["attention_mask"] = tokens["attention_mask"]
        return DictDataset(columns)

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        prompts = self.frozen_prompts
        if prompts is None:
            prompts = self._text_features(self.prompt_ids, self.prompt_mask)
        return self.scale() * image @ prompts.T

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Label logits [B, C] from the image alone (its cached embedding when zero-shot)."""
        image = batch["image_emb"] if "image_emb" in batch else self._image_features(batch["pixel_values"])
        return self._logits(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        hp = self.hparams
        if not hp.finetune:
            return None  # zero-shot: nothing to train; Lightning skips the step
        pixels = augment_images(batch["pixel_values"]) if hp.augment else batch["pixel_values"]
        image = self._image_features(pixels)
        labels = batch["label"]
        n = len(labels)
        class_loss = F.cross_entropy(self._logits(image), labels)
        loss = hp.class_weight * class_loss
        if hp.contrastive_weight > 0:
            ids = batch["input_ids"]
            same = (ids[:, None, :] == ids[None, :, :]).all(-1)
            text = self._text_features(ids, batch["attention_mask"])
            contrastive = contrastive_loss(image, text, self.scale(), same)
            loss = loss + hp.contrastive_weight * contrastive
            self.log("train/contrastive", contrastive, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/class", class_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any] | None:
        if not self.hparams.finetune:
            return None  # zero-shot: Lightning runs the (empty) fit without an optimizer
        return adamw_cosine(self, self.model.parameters(), self.hparams.lr, self.hparams.weight_decay)


def plip_teacher(task: TaskData, *, model_path: str, **kwargs: Any) -> PlipTeacher:
    """`make_teacher` for a CLIP-format checkpoint at a local `model_path` (Hydra `_partial_`)."""
    return PlipTeacher(labels=list(task.labels), model_path=model_path, **kwargs)
