"""A small, deterministic, learnable toy preference set in TRL's conversational format.

Themed like MINT's rare-disease task: made-up conditions with characteristic findings, a patient
description as the prompt, a ranked answer with the right condition first as `chosen` and three
wrong conditions as `rejected`. Each condition shares one finding with a look-alike sibling, so a
finding alone is not always decisive, but three findings always are.

    python -m mint.data.example_prefs OUT.jsonl [--n 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mint.files import write_atomic

# name -> five findings of its own; the sixth comes from SHARED_FINDINGS.
CONDITIONS: dict[str, tuple[str, ...]] = {
    "Velmora syndrome": ("broad thumbs", "sparse eyebrows", "low-set ears", "wide-spaced eyes", "small jaw"),
    "Ostrand disease": ("curved fingers", "thin upper lip", "flat nose", "dental crowding", "webbed neck"),
    "Kellan-Ruiz syndrome": ("blue sclerae", "easy bruising", "hernia", "tall stature", "long fingers"),
    "Tamsin dysplasia": ("bowed legs", "short limbs", "large head", "frontal bossing", "fused vertebrae"),
    "Brevik syndrome": ("white forelock", "two-colored irises", "cleft lip", "ear pits", "kidney cysts"),
    "Holloway disease": ("night blindness", "extra fingers", "obesity", "learning delay", "small kidneys"),
    "Ferrin syndrome": ("port-wine stain", "glaucoma", "skin nodules", "heart murmur", "coarse hair"),
    "Quillon anomaly": ("absent kneecaps", "nail dysplasia", "stiff elbows", "thick eyebrows", "ptosis"),
}
# Look-alike pairs: each pair shares one finding, and each is the other's most plausible alternative.
SHARED_FINDINGS: dict[tuple[str, str], str] = {
    ("Velmora syndrome", "Ostrand disease"): "short stature",
    ("Kellan-Ruiz syndrome", "Tamsin dysplasia"): "joint laxity",
    ("Brevik syndrome", "Holloway disease"): "hearing loss",
    ("Ferrin syndrome", "Quillon anomaly"): "seizures",
}
# Findings unrelated to any condition, so the model must learn to ignore some input.
NOISE_FINDINGS = ("fatigue", "mild fever", "headache", "dry cough", "poor appetite", "dry skin", "back pain")

SYSTEM = "You are a clinical assistant. Given a patient's findings, rank the most likely rare conditions."
QUESTION = "Which conditions are most likely? Answer MOST_LIKELY: then 3 numbered lines like 1. 'Name'."


def _findings(name: str) -> list[str]:
    shared = [finding for pair, finding in SHARED_FINDINGS.items() if name in pair]
    return [*CONDITIONS[name], *shared]


def _sibling(name: str) -> str:
    return next(other for pair in SHARED_FINDINGS for other in pair if name in pair and other != name)


def _answer(names: list[str]) -> str:
    return "MOST_LIKELY:\n" + "\n".join(f"{rank}. '{name}'" for rank, name in enumerate(names, start=1))


def make_example_prefs(n: int = 400, seed: int = 0) -> list[dict]:
    """`n` rows, conditions in turn so every condition is equally common; same seed, same rows."""
    rng = random.Random(seed)
    names = list(CONDITIONS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        findings = rng.sample(_findings(name), 3)
        if rng.random() < 0.5:
            findings.insert(rng.randrange(len(findings) + 1), rng.choice(NOISE_FINDINGS))
        described = ", ".join(findings[:-1]) + " and " + findings[-1]
        others = [other for other in names if other != name]
        third = rng.choice([other for other in others if other != _sibling(name)])
        rows.append(
            {
                "id": f"ex-{i:04d}",
                "truth": name,
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"A patient presents with {described}. {QUESTION}"},
                ],
                "chosen": [{"role": "assistant", "content": _answer([name, _sibling(name), third])}],
                "rejected": [{"role": "assistant", "content": _answer(rng.sample(others, 3))}],
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write one JSON object per line, atomically: readers never see a half-written file."""
    path = Path(path)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write MINT's toy preference set as JSONL.")
    parser.add_argument("out", type=Path, help="output .jsonl path")
    parser.add_argument("--n", type=int, default=400, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_jsonl(make_example_prefs(args.n, args.seed), args.out))


if __name__ == "__main__":
    main()
