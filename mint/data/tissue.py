"""Simulated tissue task: H&E-like patches of cell nuclei for the 19 PanNuke tissue types.

This is a simulation, not pathology. Each tissue has a hand-written profile (`PROFILES`): a mix
over the five PanNuke nucleus classes (neoplastic, inflammatory, connective/soft tissue, dead,
epithelial), nuclei per patch, a nucleus-size and an elongation multiplier, a chromatin
coarseness shift, stroma eosin, lumen fraction, a stain hue and a haematoxylin darkness.
The numbers are loosely inspired by histology (liver: sparse large round nuclei in pink
cytoplasm; lung: open alveolar space and inflammatory cells; ovary and uterus: spindle-shaped
stroma; thyroid: small round nuclei in pink colloid) but were chosen to make a learnable,
non-trivial task, and many tissues share a profile up to small differences.

A patch is drawn in three steps:
1. patch parameters: the tissue's profile jittered per patch (log-normal or Gaussian noise
   scaled by `variability`; the cell mix from a Dirichlet of concentration `mix_concentration`
   around the tissue's mix; the stain hue with std `stain_jitter`), so tissues overlap;
2. nuclei: a Poisson number of them at uniform positions, each of a class drawn from the patch's
   mix; the class sets its base look (inflammatory: small, round, very dark; connective:
   elongated, aligned with the patch's fibre direction; dead: tiny pyknotic with a pink halo;
   neoplastic: large, pleomorphic, coarse chromatin; epithelial: medium, pale, vesicular, with
   pink cytoplasm), scaled by the patch parameters plus per-nucleus noise;
3. pixels: mint.data.nuclei renders all patches of a batch at once with a Beer-Lambert
   haematoxylin/eosin stain model.
Each patch also gets a short morphology description written from what was drawn (density,
size, shape, chromatin, dominant classes, background) with randomly chosen wording; it never
names a tissue. Everything derives from `seed`; splits are stratified by tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mint.data.nuclei import NucleusBatch, PatchStyle, render_patches
from mint.data.task_data import Sample, TaskData, stratified_split
from mint.stains import EOSIN, HAEMATOXYLIN

TISSUES = [
    "Adrenal Glands",
    "Bile Duct",
    "Bladder",
    "Breast",
    "Cervix",
    "Colon",
    "Esophagus",
    "Head & Neck",
    "Kidney",
    "Liver",
    "Lung",
    "Ovarian",
    "Pancreatic",
    "Prostate",
    "Skin",
    "Stomach",
    "Testis",
    "Thyroid",
    "Uterus",
]
NUCLEUS_CLASSES = ["neoplastic", "inflammatory", "connective", "dead", "epithelial"]


@dataclass(frozen=True)
class NucleusClass:
    radius: float  # mean semi-axis in pixels of a 64-pixel patch
    aspect: float
    wobble: float
    darkness: float
    chromatin: float
    cytoplasm: float
    cytoplasm_scale: float


# Base look of each PanNuke nucleus class, in NUCLEUS_CLASSES order.
CLASS_LOOKS = [
    NucleusClass(
        radius=4.0, aspect=1.3, wobble=0.15, darkness=1.1, chromatin=0.75, cytoplasm=0.35, cytoplasm_scale=1.8
    ),
    NucleusClass(
        radius=2.1, aspect=1.05, wobble=0.03, darkness=1.5, chromatin=0.3, cytoplasm=0.1, cytoplasm_scale=1.3
    ),
    NucleusClass(
        radius=2.6, aspect=3.5, wobble=0.05, darkness=0.9, chromatin=0.35, cytoplasm=0.2, cytoplasm_scale=1.3
    ),
    NucleusClass(
        radius=1.5, aspect=1.1, wobble=0.25, darkness=1.8, chromatin=0.1, cytoplasm=0.6, cytoplasm_scale=2.2
    ),
    NucleusClass(
        radius=3.2, aspect=1.35, wobble=0.05, darkness=0.75, chromatin=0.2, cytoplasm=0.4, cytoplasm_scale=2.0
    ),
]


@dataclass(frozen=True)
class TissueProfile:
    mix: tuple[float, float, float, float, float]  # NUCLEUS_CLASSES proportions
    density: float  # mean nuclei per 64x64 patch
    size: float  # nucleus radius multiplier
    elongation: float  # multiplier on (aspect - 1)
    chromatin: float  # added to every nucleus's coarseness
    stroma: float  # eosin concentration of the background
    lumen: float  # fraction of open (white) space
    hue: float  # haematoxylin hue: > 0 bluer, < 0 more purple-red
    darkness: float  # haematoxylin concentration multiplier


def _p(mix, density, size, elongation, chromatin, stroma, lumen, hue, darkness) -> TissueProfile:
    return TissueProfile(tuple(mix), density, size, elongation, chromatin, stroma, lumen, hue, darkness)


# fmt: off
PROFILES = {  # mix: neoplastic, inflammatory, connective, dead, epithelial
    "Adrenal Glands": _p((.30, .05, .15, .02, .48), 18, 1.05, 0.8, -0.10, 0.33, 0.05,  0.0, 0.90),
    "Bile Duct":      _p((.35, .10, .25, .02, .28), 20, 0.95, 1.0,  0.00, 0.27, 0.25,  0.3, 1.00),
    "Bladder":        _p((.50, .10, .15, .03, .22), 30, 1.00, 1.0,  0.10, 0.21, 0.05, -0.2, 1.05),
    "Breast":         _p((.55, .12, .20, .02, .11), 28, 1.10, 1.0,  0.15, 0.24, 0.10,  0.2, 1.10),
    "Cervix":         _p((.40, .22, .15, .03, .20), 30, 0.95, 1.0,  0.05, 0.24, 0.05, -0.3, 1.05),
    "Colon":          _p((.45, .15, .12, .04, .24), 32, 1.00, 1.3,  0.10, 0.21, 0.15,  0.1, 1.00),
    "Esophagus":      _p((.35, .12, .22, .02, .29), 24, 1.00, 1.0, -0.05, 0.30, 0.05, -0.1, 0.95),
    "Head & Neck":    _p((.45, .22, .20, .05, .08), 26, 1.05, 1.1,  0.10, 0.27, 0.05,  0.4, 1.10),
    "Kidney":         _p((.30, .10, .12, .02, .46), 24, 0.90, 0.9, -0.10, 0.36, 0.20,  0.1, 0.90),
    "Liver":          _p((.35, .08, .08, .02, .47), 12, 1.15, 0.8, -0.15, 0.39, 0.05, -0.1, 0.85),
    "Lung":           _p((.35, .28, .20, .05, .12), 16, 1.00, 1.1,  0.05, 0.21, 0.40,  0.2, 1.00),
    "Ovarian":        _p((.35, .05, .50, .02, .08), 26, 0.95, 1.4,  0.00, 0.30, 0.05, -0.2, 1.00),
    "Pancreatic":     _p((.40, .10, .15, .02, .33), 22, 0.95, 1.0,  0.00, 0.33, 0.10,  0.3, 0.95),
    "Prostate":       _p((.40, .10, .22, .02, .26), 22, 1.00, 1.0, -0.05, 0.27, 0.25, -0.3, 0.95),
    "Skin":           _p((.30, .15, .30, .04, .21), 20, 0.95, 1.2,  0.00, 0.36, 0.05,  0.0, 1.05),
    "Stomach":        _p((.40, .20, .12, .03, .25), 30, 0.95, 1.1,  0.05, 0.24, 0.15, -0.1, 1.00),
    "Testis":         _p((.50, .10, .12, .08, .20), 34, 1.00, 0.9,  0.20, 0.24, 0.10,  0.3, 1.10),
    "Thyroid":        _p((.30, .08, .10, .02, .50), 18, 0.95, 0.9, -0.10, 0.42, 0.15, -0.2, 0.90),
    "Uterus":         _p((.40, .08, .40, .03, .09), 32, 0.90, 1.3,  0.05, 0.24, 0.05,  0.0, 1.00),
}
# fmt: on

# Direction in OD space that turns the haematoxylin from purple towards blue as `hue` grows.
_BLUE_SHIFT = np.array([-0.15, 0.05, 0.25])
_RENDER_BATCH = 128  # patches per vectorised render: bounds the [batch, nuclei, H, W] temporaries


def simulate_tissue(
    *,
    n_per_tissue: int = 60,
    image_size: int = 64,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    variability: float = 1.0,
    mix_concentration: float = 20.0,
    stain_jitter: float = 0.15,
    pixel_noise: float = 0.03,
) -> TaskData:
    """`n_per_tissue` patches of `image_size`² pixels for each of the 19 tissues, split by tissue.

    Difficulty knobs: `variability` scales the per-patch jitter of every profile parameter (0
    gives each tissue one look up to nucleus placement), `mix_concentration` is the Dirichlet
    concentration of a patch's cell mix around its tissue's (lower = more overlap),
    `stain_jitter` the std of the per-patch stain hue, `pixel_noise` the std of pixel OD noise.
    """
    if n_per_tissue < 1 or image_size < 16:
        raise ValueError(f"n_per_tissue={n_per_tissue} must be >= 1 and image_size={image_size} >= 16")
    if variability < 0 or mix_concentration <= 0 or stain_jitter < 0 or pixel_noise < 0:
        raise ValueError("variability, stain_jitter, pixel_noise must be >= 0 and mix_concentration > 0")
    # Independent streams, so that e.g. changing the wording never changes the pixels.
    params_rng, nuclei_rng, pixel_rng, text_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    labels = np.repeat(np.arange(len(TISSUES)), n_per_tissue)
    patch = _draw_patch_params(labels, params_rng, variability, mix_concentration, stain_jitter, image_size)
    nuclei, types = _draw_nuclei(patch, nuclei_rng, image_size)
    style = PatchStyle(
        stroma=patch["stroma"],
        lumen=patch["lumen"],
        h_vector=patch["h_vector"],
        e_vector=np.broadcast_to(EOSIN, (len(labels), 3)),
        noise=np.full(len(labels), pixel_noise),
    )
    images = np.concatenate(
        [
            render_patches(_slice(nuclei, sl), _slice(style, sl), image_size, pixel_rng)
            for sl in (slice(i, i + _RENDER_BATCH) for i in range(0, len(labels), _RENDER_BATCH))
        ]
    )

    samples = []
    for i, label in enumerate(labels.tolist()):
        valid = nuclei.valid[i]
        counts = {name: int(((types[i] == k) & valid).sum()) for k, name in enumerate(NUCLEUS_CLASSES)}
        observed = {
            "n_nuclei": int(valid.sum()),
            # In units of a 64-pixel patch, so that the wording does not change with image_size.
            "mean_radius": float(nuclei.radius[i][valid].mean() * 64 / image_size),
            "mean_aspect": float(nuclei.aspect[i][valid].mean()),
            "mean_chromatin": float(nuclei.chromatin[i][valid].mean()),
            "stroma": float(patch["stroma"][i]),
            "lumen": float(patch["lumen"][i]),
        }
        meta = {
            "counts": counts,
            "generator": {k: round(v, 4) for k, v in observed.items()}
            | {"hue": round(float(patch["hue"][i]), 4)},
        }
        samples.append(
            Sample(
                id=f"tissue-{seed}-{i:05d}",
                label=label,
                text=describe_patch(counts=counts, area=(image_size / 64) ** 2, rng=text_rng, **observed),
                image=images[i],
                meta=meta,
            )
        )
    splits = stratified_split(labels.tolist(), split_fractions, seed)
    return TaskData(
        name="tissue",
        labels=list(TISSUES),
        splits={split: [samples[i] for i in idx] for split, idx in splits.items()},
    )


def _draw_patch_params(
    labels: np.ndarray,
    rng: np.random.Generator,
    variability: float,
    mix_concentration: float,
    stain_jitter: float,
    image_size: int,
) -> dict[str, np.ndarray]:
    profiles = [PROFILES[TISSUES[k]] for k in labels]
    n = len(labels)

    def column(name: str) -> np.ndarray:
        return np.array([getattr(p, name) for p in profiles], dtype=float)

    def lognormal(scale: float) -> np.ndarray:
        return np.exp(rng.normal(0.0, scale * variability, n))

    area = (image_size / 64) ** 2
    mixes = np.array([p.mix for p in profiles])
    hue = column("hue") + rng.normal(0.0, stain_jitter, n)
    h_vector = HAEMATOXYLIN[None] + hue[:, None] * _BLUE_SHIFT[None]
    return {
        "mix": np.stack([rng.dirichlet(mix_concentration * m) for m in mixes]),
        "density": column("density") * area * lognormal(0.25),
        "size": column("size") * lognormal(0.1),
        "elongation": column("elongation") * lognormal(0.15),
        "chromatin": column("chromatin") + rng.normal(0.0, 0.1 * variability, n),
        "stroma": column("stroma") * lognormal(0.2),
        "lumen": np.clip(column("lumen") + rng.normal(0.0, 0.08 * variability, n), 0.0, 0.6),
        "darkness": column("darkness") * lognormal(0.08),
        "fibre_angle": rng.uniform(0.0, np.pi, n),
        "hue": hue,
        "h_vector": h_vector / np.linalg.norm(h_vector, axis=1, keepdims=True),
    }


def _draw_nuclei(
    patch: dict[str, np.ndarray], rng: np.random.Generator, image_size: int
) -> tuple[NucleusBatch, np.ndarray]:
    """All nuclei of all patches as [patches, most nuclei in a patch] arrays, and their classes."""
    count = np.maximum(rng.poisson(patch["density"]), 1)  # every patch shows at least one nucleus
    n, m = len(count), int(count.max())
    valid = np.arange(m)[None, :] < count[:, None]
    # Class of each nucleus: inverse-CDF sampling from each patch's own mix.
    cdf = np.cumsum(patch["mix"], axis=1)
    types = np.minimum((rng.uniform(size=(n, m))[..., None] > cdf[:, None, :]).sum(-1), len(CLASS_LOOKS) - 1)

    def base(name: str) -> np.ndarray:
        return np.array([getattr(c, name) for c in CLASS_LOOKS])[types]

    def jitter(scale: float) -> np.ndarray:
        return np.exp(rng.normal(0.0, scale, (n, m)))

    scale = image_size / 64
    aspect = 1.0 + (base("aspect") - 1.0) * patch["elongation"][:, None] * jitter(0.2)
    connective = types == NUCLEUS_CLASSES.index("connective")
    # Spindle cells run along the patch's fibre direction; other nuclei point anywhere.
    angle = np.where(
        connective,
        patch["fibre_angle"][:, None] + rng.normal(0.0, 0.3, (n, m)),
        rng.uniform(0.0, np.pi, (n, m)),
    )
    nuclei = NucleusBatch(
        valid=valid,
        x=rng.uniform(0.0, image_size, (n, m)),
        y=rng.uniform(0.0, image_size, (n, m)),
        radius=base("radius") * patch["size"][:, None] * scale * jitter(0.12),
        aspect=aspect,
        angle=angle,
        wobble=base("wobble") * jitter(0.3),
        phase=rng.uniform(0.0, 2 * np.pi, (n, m, 3)),
        darkness=base("darkness") * patch["darkness"][:, None] * jitter(0.1),
        chromatin=np.clip(
            base("chromatin") + patch["chromatin"][:, None] + rng.normal(0.0, 0.1, (n, m)), 0, 1
        ),
        cytoplasm=base("cytoplasm") * jitter(0.2),
        cytoplasm_scale=base("cytoplasm_scale"),
    )
    return nuclei, types


def _slice(batch: NucleusBatch | PatchStyle, sl: slice) -> NucleusBatch | PatchStyle:
    return type(batch)(**{k: v[sl] for k, v in vars(batch).items()})


# --------------------------------------------------------------------------- descriptions

_DENSITY = (
    (14, ["Sparse", "Scattered", "Few widely spaced"]),
    (26, ["Moderately dense", "Moderately crowded", "Evenly spaced"]),
    (float("inf"), ["Densely packed", "Crowded", "Tightly packed"]),
)
_SIZE = (
    (2.6, ["small"]),
    (3.3, ["medium-sized", "intermediate"]),
    (float("inf"), ["large", "enlarged"]),
)
_SHAPE = (
    (1.35, ["round", "rounded"]),
    (1.9, ["oval", "ovoid"]),
    (float("inf"), ["elongated", "spindle-shaped"]),
)
_CHROMATIN = (
    (0.3, ["fine, even chromatin", "vesicular chromatin", "pale, finely granular chromatin"]),
    (0.55, ["granular chromatin", "moderately coarse chromatin"]),
    (float("inf"), ["coarse, clumped chromatin", "hyperchromatic, coarse chromatin"]),
)
_CLASS_PHRASES = {
    "neoplastic": ["many atypical (neoplastic) nuclei", "numerous neoplastic-looking nuclei"],
    "inflammatory": ["many small inflammatory cells", "a prominent inflammatory infiltrate"],
    "connective": ["abundant spindle-shaped stromal cells", "many connective-tissue nuclei"],
    "dead": ["scattered apoptotic or necrotic cells", "several dead, pyknotic cells"],
    "epithelial": ["many epithelial nuclei", "sheets of epithelial cells"],
}
_BACKGROUND = {
    "lumen": [", around open luminal spaces", ", between clear empty spaces"],
    "pink": [", in a dense eosinophilic background", ", set in pink stroma"],
    "pale": [", in a pale background", ", with scant stroma"],
}


def _pick(table: tuple, value: float, rng: np.random.Generator) -> str:
    for upper, words in table:
        if value < upper:
            return words[rng.integers(len(words))]
    raise AssertionError("tables end with an infinite bound")


def describe_patch(
    *,
    counts: dict[str, int],
    n_nuclei: int,
    area: float,
    mean_radius: float,
    mean_aspect: float,
    mean_chromatin: float,
    stroma: float,
    lumen: float,
    rng: np.random.Generator,
) -> str:
    """One or two sentences on what a patch shows, worded at random; never names a tissue.

    `area` is the patch's area in 64x64 patches: density words compare nuclei per 64x64.
    """
    head = (
        f"{_pick(_DENSITY, n_nuclei / area, rng)} {_pick(_SIZE, mean_radius, rng)} "
        f"{_pick(_SHAPE, mean_aspect, rng)} nuclei with {_pick(_CHROMATIN, mean_chromatin, rng)}"
    )
    background = "lumen" if lumen > 0.2 else "pink" if stroma > 0.3 else "pale"
    head += _BACKGROUND[background][rng.integers(2)]
    total = max(n_nuclei, 1)  # a patch always has a nucleus; max() guards direct callers
    ranked = sorted(counts, key=lambda name: -counts[name])
    notable = [name for name in ranked[:2] if counts[name] / total >= 0.3]
    if counts["dead"] / total >= 0.08 and "dead" not in notable:
        notable.append("dead")
    if not notable:
        return f"{head}; a mixed population of cell types."
    phrases = [_CLASS_PHRASES[name][rng.integers(2)] for name in notable]
    joiner = [" and ", ", plus ", "; also "][rng.integers(3)]
    return f"{head}. {phrases[0][0].upper()}{phrases[0][1:]}" + "".join(joiner + p for p in phrases[1:]) + "."
