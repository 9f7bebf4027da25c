"""What the retriever compares: MiniLM sentence embeddings of text, stain statistics of images.

Text uses the teacher's frozen all-MiniLM-L6-v2 tower (mint.sentence_encoder): one
model in the process, embeddings memoised per text and cached on disk.

Images use a fixed, label-free embedding: haematoxylin/eosin stain statistics of the patch
(colour deconvolution, as pathologists' stain normalisation does). Why not the tissue
teacher's trained image tower: it was fit to the training labels, so nearest neighbours in
its space would hand the student the teacher's own prediction, and the RAG baseline would
become a copy of the teacher rather than a retrieval baseline. Stain statistics know nothing
about tissues; they find patches that *look* alike (nucleus density, darkness, stain hue),
which is what "retrieve similar training images" promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mint.sentence_encoder import default_model_dir, embed_frozen, frozen_encoder
from mint.stains import optical_density, stain_concentrations

# Stain concentration ranges for the histograms (optical density units): nuclei reach ~2
# in haematoxylin, eosin-stained stroma ~1.
_H_EDGES = np.linspace(0.0, 2.0, 9)
_E_EDGES = np.linspace(0.0, 1.0, 9)
_DARK_H = 0.6  # haematoxylin density above which a pixel counts as nucleus


def text_token_counter(max_length: int):
    """len(MiniLM tokens) of a text, without [CLS]/[SEP]: how chunks are measured."""
    tokenizer = frozen_encoder(str(default_model_dir()), max_length, True).tokenizer
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def embed_texts(texts: Sequence[str], *, max_length: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """[N, 384] L2-normalised MiniLM embeddings (cosine similarity = dot product)."""
    return embed_frozen(list(texts), max_length=max_length, cache_dir=cache_dir, progress=False).numpy()


def stain_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """[N, 26] stain statistics of uint8 [H, W, 3] patches (not yet standardised).

    Per patch: mean and std of the optical density per RGB channel (6), 8-bin histograms of
    the haematoxylin and eosin concentrations (16), the nucleus-pixel fraction, the density
    of nucleus borders across rows and columns, and the 90th haematoxylin percentile (4).
    """
    rows = []
    for image in images:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"stain_features expects uint8 [H, W, 3] images, got shape {image.shape}")
        od = optical_density(image)
        h, e = np.moveaxis(stain_concentrations(od), -1, 0)  # [H, W] each
        dark = h > _DARK_H
        rows.append(
            np.concatenate(
                [
                    od.mean(axis=(0, 1)),
                    od.std(axis=(0, 1)),
                    np.histogram(h, bins=_H_EDGES)[0] / h.size,
                    np.histogram(e, bins=_E_EDGES)[0] / e.size,
                    [
                        dark.mean(),
                        np.abs(np.diff(dark, axis=0)).mean(),
                        np.abs(np.diff(dark, axis=1)).mean(),
                        np.percentile(h, 90),
                    ],
                ]
            )
        )
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 26), np.float32)


def embed_images(images: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """[N, 26] stain statistics standardised by the knowledge base's (training) mean/std, L2-normalised.

    Standardising puts every statistic on one scale, so cosine similarity weighs them alike.
    """
    z = (stain_features(images) - mean) / std
    return (z / np.linalg.norm(z, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)
