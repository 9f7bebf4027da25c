"""The multimodal fusion teacher: text tower + image branch -> one classifier over the labels.

- text: MiniLM sentence embeddings. Frozen (default), they are computed once in
  `make_dataset` and the module holds only a projection; trainable, the tower
  is a submodule and runs in `forward`.
- image: whichever the samples carry: an MLP over a feature vector (the
  rare-disease facial-gestalt embedding) or a timm CNN over the photo/patch.
- fusion: `concat`, `gated` (a learned sigmoid gate mixes the two projected
  modalities per feature) or `cross_attention` (text tokens attend to image
  tokens). With one modality in `modalities` there is nothing to fuse and the
  classifier sits on that branch: the text-only / image-only ablations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from mint.data.task_data import Sample, TaskData
from mint.sentence_encoder import TextEncoder, default_model_dir, embed_frozen
from mint.teacher.crossfit import DictDataset, TeacherModule, adamw_cosine

MODALITIES = ("text", "image")
FUSIONS = ("concat", "gated", "cross_attention")
# ImageNet statistics: what timm backbones expect, and harmless for randomly initialised ones.
IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float [3, size, size]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (x - IMAGE_MEAN) / IMAGE_STD


def _tokens_mlp(in_dim: int, n_tokens: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """in_dim -> n_tokens * hidden_dim; reshaped to [B, n_tokens, hidden_dim] by the caller."""
    return nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, n_tokens * hidden_dim), nn.GELU(), nn.Dropout(dropout)
    )


class FusionTeacher(TeacherModule):
    def __init__(
        self,
        *,
        num_labels: int,
        modalities: Sequence[str] = ("text", "image"),
        fusion: str = "gated",
        vector_dim: int | None = None,
        image_backbone: str | None = None,
        image_size: int = 64,
        text_model_dir: str | None = None,
        text_trainable: bool = False,
        text_max_length: int = 128,
        text_lr: float = 2e-5,
        embed_cache_dir: str | None = None,
        hidden_dim: int = 256,
        n_tokens: int = 4,
        n_heads: int = 4,
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
    ) -> None:
        """`vector_dim` xor `image_backbone` selects the image branch (needed when "image" in modalities).

        n_tokens / n_heads only matter for cross_attention; text_lr only for a trainable text tower.
        """
        super().__init__()
        modalities = list(modalities)
        if not modalities or set(modalities) - set(MODALITIES):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if "image" in modalities and (vector_dim is None) == (image_backbone is None):
            raise ValueError(
                "the image branch needs exactly one of vector_dim (MLP) or image_backbone (timm CNN)"
            )
        self.save_hyperparameters()
        self.modalities = modalities
        self.fusion = fusion
        self.text_model_dir = str(text_model_dir or default_model_dir())
        # Tokens exist for cross-attention to attend over; the other fusions use one vector per modality.
        self.n_tokens = n_tokens if fusion == "cross_attention" and len(modalities) == 2 else 1

        self.text_encoder: TextEncoder | None = None
        if "text" in modalities:
            if text_trainable:
                self.text_encoder = TextEncoder(
                    self.text_model_dir, trainable=True, max_length=text_max_length
                )
                text_dim = self.text_encoder.dim
            else:
                # Frozen, the tower runs once in make_dataset and stays out of the module and its checkpoint.
                text_dim = AutoConfig.from_pretrained(self.text_model_dir).hidden_size
            self.text_branch = _tokens_mlp(text_dim, self.n_tokens, hidden_dim, dropout)
        if "image" in modalities:
            if vector_dim is not None:
                self.vector_branch = _tokens_mlp(vector_dim, self.n_tokens, hidden_dim, dropout)
            else:
                # pretrained=False: the machines are offline; num_classes=0 drops timm's own head.
                self.cnn = timm.create_model(image_backbone, pretrained=False, num_classes=0)
                self.cnn_proj = nn.Sequential(
                    nn.Linear(self.cnn.num_features, hidden_dim), nn.GELU(), nn.Dropout(dropout)
                )

        fused_dim = hidden_dim
        if len(modalities) == 2 and fusion == "concat":
            fused_dim = 2 * hidden_dim
        elif len(modalities) == 2 and fusion == "gated":
            self.gate = nn.Linear(2 * hidden_dim, hidden_dim)
        elif len(modalities) == 2:
            self.attention = nn.MultiheadAttention(hidden_dim, n_heads, dropout=dropout, batch_first=True)
            self.attention_norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Sequential(
            nn.LayerNorm(fused_dim), nn.Dropout(dropout), nn.Linear(fused_dim, num_labels)
        )

    def make_dataset(self, samples: Sequence[Sample]) -> DictDataset:
        hp = self.hparams
        columns: dict[str, Any] = {"label": torch.tensor([s.label for s in samples], dtype=torch.long)}
        if "text" in self.modalities:
            texts = [s.text for s in samples]
            if hp.text_trainable:
                columns["text"] = texts
            else:
                columns["text_emb"] = embed_frozen(
                    texts, self.text_model_dir, hp.text_max_length, cache_dir=hp.embed_cache_dir
                )
        if "image" in self.modalities:
            key = "vector" if hp.vector_dim is not None else "image"
            missing = [s.id for s in samples if getattr(s, key) is None]
            if missing:
                raise ValueError(f"image branch expects `{key}` on every sample; missing on {missing[:5]}")
            if key == "vector":
                columns["vector"] = torch.from_numpy(np.stack([s.vector for s in samples]).astype(np.float32))
            else:
                columns["image"] = torch.stack([image_tensor(s.image, hp.image_size) for s in samples])
        return DictDataset(columns)

    def _text_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        emb = self.text_encoder(batch["text"]) if self.text_encoder else batch["text_emb"]
        return self.text_branch(emb).view(len(emb), self.n_tokens, -1)

    def _image_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.hparams.vector_dim is not None:
            vector = batch["vector"]
            return self.vector_branch(vector).view(len(vector), self.n_tokens, -1)
        feature_map = self.cnn.forward_features(batch["image"])  # [B, F, h, w]
        tokens = self.cnn_proj(feature_map.flatten(2).transpose(1, 2))  # one token per position
        # Cross-attention attends over the positions; the other fusions take their mean.
        return tokens if self.n_tokens > 1 else tokens.mean(1, keepdim=True)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        text = self._text_tokens(batch) if "text" in self.modalities else None
        image = self._image_tokens(batch) if "image" in self.modalities else None
        if text is None or image is None:
            fused = (text if text is not None else image).mean(1)
        elif self.fusion == "concat":
            fused = torch.cat([text.mean(1), image.mean(1)], dim=-1)
        elif self.fusion == "gated":
            t, i = text.mean(1), image.mean(1)
            gate = torch.sigmoid(self.gate(torch.cat([t, i], dim=-1)))
            fused = gate * t + (1 - gate) * i
        else:
            attended, _ = self.attention(text, image, image, need_weights=False)
            fused = self.attention_norm(text + attended).mean(1)
        return self.head(fused)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.text_encoder is None:
            return adamw_cosine(self, self.parameters(), self.hparams.lr, self.hparams.weight_decay)
        # A pretrained tower fine-tunes at a much smaller rate than the freshly initialised layers.
        tower = set(self.text_encoder.parameters())
        groups = [
            {"params": [p for p in self.parameters() if p not in tower]},
            {"params": list(tower), "lr": self.hparams.text_lr},
        ]
        return adamw_cosine(self, groups, self.hparams.lr, self.hparams.weight_decay)


def fusion_teacher(task: TaskData, *, image_backbone: str = "resnet18", **kwargs: Any) -> FusionTeacher:
    """`make_teacher` for fit_teacher: a FusionTeacher sized from the task.

    The label count comes from the task; the image branch from its samples: an MLP
    when they carry a `vector`, else `image_backbone` over their `image`. Other
    kwargs go to FusionTeacher unchanged (Hydra: `_target_` this with `_partial_: true`).
    """
    first = task.splits["train"][0]
    if first.vector is not None:
        image_kwargs: dict[str, Any] = {"vector_dim": int(np.asarray(first.vector).shape[-1])}
    elif first.image is not None:
        image_kwargs = {"image_backbone": image_backbone}
    else:
        image_kwargs = {}
        if "image" in kwargs.get("modalities", MODALITIES):
            raise ValueError(
                f"task {task.name!r}: samples carry neither `vector` nor `image` for the image branch"
            )
    return FusionTeacher(num_labels=len(task.labels), **image_kwargs, **kwargs)
