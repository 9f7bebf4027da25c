"""H&E colour deconvolution (Ruifrok & Johnston 2001): the stain vectors and the unmixing.

Shared by the nucleus renderer (which mixes the stains), the PanNuke loader and the RAG
image embedding (which unmix them). Beer-Lambert: a pixel's optical density is the sum of
each stain's concentration times its colour vector, and RGB = 255 * exp(-OD).
"""

from __future__ import annotations

import numpy as np

# Unit optical-density vectors of the two stains in RGB.
HAEMATOXYLIN = np.array([0.650, 0.704, 0.286])
EOSIN = np.array([0.072, 0.990, 0.105])
# [2, 3]: optical density -> (haematoxylin, eosin) concentrations by least squares.
_UNMIX = np.linalg.pinv(np.stack([HAEMATOXYLIN, EOSIN], axis=1))


def optical_density(image: np.ndarray) -> np.ndarray:
    """-log(RGB / 255) of uint8 (or 0-255 float) pixels, float64; 0 is clipped to 1 to stay finite."""
    return -np.log(np.clip(image.astype(np.float64), 1.0, 255.0) / 255.0)


def stain_concentrations(od: np.ndarray) -> np.ndarray:
    """[..., 3] optical densities -> [..., 2] haematoxylin and eosin concentrations."""
    return od @ _UNMIX.T
