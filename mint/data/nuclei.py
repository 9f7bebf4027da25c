"""Vectorised numpy renderer of H&E-like patches of cell nuclei (the pixels of mint.data.tissue).

Colour follows the Beer-Lambert stain model used for colour deconvolution (`mint.stains`):
each pixel's optical density is a haematoxylin concentration times the haematoxylin colour
vector plus an eosin concentration times the eosin vector, and RGB = 255 * exp(-OD).
Nuclei put haematoxylin (purple-blue) into soft-edged ellipses with a wavy outline
(pleomorphism) and blotchy chromatin; their cytoplasm and the stroma put eosin (pink); lumina
stay near white. All patches of a batch are rendered together as [batch, nuclei, H, W] arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NucleusBatch:
    """Nuclei of `B` patches, padded to `M` per patch ([B, M] arrays; `valid` marks real ones)."""

    valid: np.ndarray  # bool
    x: np.ndarray  # centre, pixels
    y: np.ndarray
    radius: np.ndarray  # mean semi-axis, pixels
    aspect: np.ndarray  # major / minor semi-axis, >= 1
    angle: np.ndarray  # radians
    wobble: np.ndarray  # amplitude of the outline's harmonics (0 = smooth ellipse)
    phase: np.ndarray  # [B, M, 3] phases of harmonics 2, 3, 4
    darkness: np.ndarray  # haematoxylin concentration
    chromatin: np.ndarray  # 0 fine/even .. 1 coarse/clumped
    cytoplasm: np.ndarray  # eosin concentration of the surrounding cytoplasm
    cytoplasm_scale: np.ndarray  # cytoplasm radius / nucleus radius


@dataclass(frozen=True)
class PatchStyle:
    """Per-patch background and stain parameters ([B] arrays unless noted)."""

    stroma: np.ndarray  # eosin concentration of the stroma
    lumen: np.ndarray  # fraction of the patch left as white lumen / empty space
    h_vector: np.ndarray  # [B, 3] haematoxylin OD vector (jittered per patch)
    e_vector: np.ndarray  # [B, 3]
    noise: np.ndarray  # std of pixel-level OD noise


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of `sigma` pixels over the last two axes, rescaled to std 1."""
    noise = rng.standard_normal(shape)
    height, width = shape[-2:]
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))  # Fourier transform of the Gaussian
    blurred = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(height, width))
    blurred -= blurred.mean(axis=(-2, -1), keepdims=True)
    return blurred / (blurred.std(axis=(-2, -1), keepdims=True) + 1e-8)


def render_patches(
    nuclei: NucleusBatch, style: PatchStyle, image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 [B, S, S, 3] patches for a batch of nuclei and styles.

    Each nucleus is drawn in a small window around its centre and max-composited onto a canvas
    padded by the largest window, so that cost grows with the number of nuclei, not with
    nuclei x image area.
    """
    batch = nuclei.valid.shape[0]
    image_of, slot = np.nonzero(nuclei.valid)
    cells = {k: v[image_of, slot] for k, v in vars(nuclei).items() if k != "valid"}
    major = cells["radius"] * np.sqrt(cells["aspect"])
    # The outline reaches at most 1 + wobble * (1/2 + 1/3 + 1/4) of the ellipse; cytoplasm beyond.
    reach = cells["cytoplasm_scale"] * (1 + 1.09 * cells["wobble"]) * major
    half = np.ceil(reach).astype(int) + 2
    pad = int(half.max()) + 1
    canvas = image_size + 2 * pad
    texture = smooth_noise(rng, (batch, canvas, canvas), sigma=0.8).astype(np.float32).ravel()
    layers = np.zeros((3, batch * canvas * canvas), dtype=np.float32)  # haematoxylin, cytoplasm, mask
    # Window sizes by quantile of the cells' reach: small inflammatory cells and large neoplastic
    # ones (and a few outliers) would otherwise all pay for the largest window.
    bounds = np.unique(np.quantile(half, [0.3, 0.6, 0.9, 1.0], method="higher"))
    for low, high in zip(np.concatenate([[-1], bounds[:-1]]), bounds, strict=True):
        group = (half > low) & (half <= high)
        if group.any():
            _draw_windows(
                {k: v[group] for k, v in cells.items()},
                image_of[group],
                int(half[group].max()),
                pad=pad,
                canvas=canvas,
                texture=texture,
                layers=layers,
            )
    haematoxylin, cytoplasm_e, in_nucleus = (
        layer.reshape(batch, canvas, canvas)[:, pad:-pad, pad:-pad].astype(float) for layer in layers
    )

    # Stroma: low-frequency eosin texture; lumina: thresholded smooth noise.
    fibres = smooth_noise(rng, (batch, image_size, image_size), sigma=2.0)
    space = smooth_noise(rng, (batch, image_size, image_size), sigma=6.0)
    ranked = np.sort(space.reshape(batch, -1), axis=1)
    index = np.rint(np.clip(style.lumen, 0.0, 1.0) * (ranked.shape[1] - 1)).astype(int)
    cut = np.where(style.lumen > 0, ranked[np.arange(batch), index], -np.inf)  # lumen 0: no open space
    open_space = np.clip((cut[:, None, None] - space) * 4.0, 0.0, 1.0)  # 1 inside lumina
    stroma_e = style.stroma[:, None, None] * np.clip(1.0 + 0.35 * fibres, 0.2, None) * (1.0 - open_space)
    eosin = np.maximum(stroma_e, cytoplasm_e * (1.0 - 0.7 * open_space)) * (1.0 - 0.6 * in_nucleus)

    od = (
        haematoxylin[..., None] * style.h_vector[:, None, None, :]
        + eosin[..., None] * style.e_vector[:, None, None, :]
        + 0.03  # glass and mounting medium are never perfectly white
    )
    od += style.noise[:, None, None, None] * rng.standard_normal(od.shape)
    rgb = 255.0 * np.exp(-np.clip(od, 0.0, None))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _draw_windows(
    cells: dict[str, np.ndarray],
    image_of: np.ndarray,
    half: int,
    *,
    pad: int,
    canvas: int,
    texture: np.ndarray,
    layers: np.ndarray,
) -> None:
    """Draw K nuclei in (2 half + 1)² windows and max-composite them into `layers` (flat canvases)."""
    window = 2 * half + 1
    offsets = np.arange(window)
    # Top-left pixel of each window in canvas coordinates; pixel centres relative to the nucleus.
    ox = np.floor(cells["x"]).astype(int) - half + pad
    oy = np.floor(cells["y"]).astype(int) - half + pad
    dx = ((ox - pad + 0.5 - cells["x"])[:, None, None] + offsets[None, None, :]).astype(np.float32)
    dy = ((oy - pad + 0.5 - cells["y"])[:, None, None] + offsets[None, :, None]).astype(np.float32)

    def per_cell(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, None]

    major = cells["radius"] * np.sqrt(cells["aspect"])
    minor = per_cell(cells["radius"] / np.sqrt(cells["aspect"]))
    cos, sin = per_cell(np.cos(cells["angle"])), per_cell(np.sin(cells["angle"]))
    u, v = (dx * cos + dy * sin) / per_cell(major), (-dx * sin + dy * cos) / minor
    rho = np.sqrt(u**2 + v**2) + 1e-6  # 1 on the smooth ellipse
    # cos(k*theta + phase) by angle addition from cos/sin of theta: no arctan2, no complex powers.
    c1, s1 = u / rho, v / rho
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
    harmonics = {2: (c2, s2), 3: (c1 * c2 - s1 * s2, s1 * c2 + c1 * s2), 4: (c2 * c2 - s2 * s2, 2 * c2 * s2)}
    phase = cells["phase"]
    wave = sum(
        (ck * per_cell(np.cos(phase[:, k - 2])) - sk * per_cell(np.sin(phase[:, k - 2]))) / k
        for k, (ck, sk) in harmonics.items()
    )
    outline = 1.0 + per_cell(cells["wobble"]) * wave
    # Signed distance to the outline in pixels (approx.), turned into a ~1-pixel soft edge.
    edge = (outline - rho) * minor
    nucleus_mask = np.clip(edge + 0.5, 0.0, 1.0)
    cyto_mask = np.clip((per_cell(cells["cytoplasm_scale"]) * outline - rho) * minor * 0.5 + 0.5, 0.0, 1.0)

    flat = (
        (image_of[:, None, None] * canvas + oy[:, None, None] + offsets[None, :, None]) * canvas
        + ox[:, None, None]
        + offsets[None, None, :]
    )
    # Chromatin: blotchy texture whose contrast grows with coarseness; fine chromatin is nearly even.
    contrast = per_cell(0.1 + 0.5 * cells["chromatin"])
    blotches = np.clip(1.0 + contrast * texture[flat], 0.2, None)
    # The rim (nuclear membrane) is darker than the centre, more so for vesicular (fine) chromatin.
    rim = 1.0 + 0.35 * np.exp(-np.clip(edge, 0, None)) * per_cell(1.0 - cells["chromatin"])
    nucleus_h = nucleus_mask * per_cell(cells["darkness"]) * blotches * rim
    index = flat.ravel()
    np.maximum.at(layers[0], index, nucleus_h.ravel())
    np.maximum.at(layers[1], index, (cyto_mask * per_cell(cells["cytoplasm"])).ravel())
    np.maximum.at(layers[2], index, nucleus_mask.ravel())
