"""Simulated rare-disease patients: HPO findings rendered as clinical notes, plus a face vector.

This is a SIMULATION, built because the paper's data (GestaltMatcher Database photos and
notes) is not public. What is real: the syndromes, their names and their phenotype
annotations come from the Human Phenotype Ontology's OMIM annotations (package `hpo3`).
What is made up: the patients, their notes and their "faces".

The generative model, per panel (`panel_seed`, the same for every `seed`):
- Syndromes: OMIM entries with a named syndrome/dysplasia/disease, >= `min_facial_terms`
  annotated terms under "Abnormality of the face" and >= `min_terms` under "Phenotypic
  abnormality"; one per numbered series ("Noonan syndrome 1..14" -> "Noonan syndrome"),
  names pairwise difflib-distinct (< 0.8, as evaluation matches names). The panel is drawn
  as look-alike groups: a random syndrome plus its `lookalike_group_size - 1` nearest
  neighbours by information-content-weighted cosine over ancestor-propagated annotations,
  so that notes are often ambiguous between group members.
- Each syndrome gets per-term sampling weights: log-normal (`frequency_spread`; hpo3 carries
  no frequency annotations) times exp(-`specificity_bias` x IC), because notes record
  generic findings (developmental delay, hypotonia) far more often than pathognomonic ones;
  `unannotated_per_syndrome` findings OMIM does not list (siblings of annotated terms in
  the ontology); and a facial-gestalt centroid in R^gestalt_dim.

Per patient (`seed`); age (log-normal around 5 years: GMDB is mostly children) and sex
(90% male for X-linked recessive syndromes, else 50%) first, then the findings, none of
them of the other sex's genitalia:
- k annotated terms drawn by weight, k = fraction x (number of annotated terms) with the
  fraction uniform in `term_fraction`, clipped to [`min_annotated_terms`, `max_annotated_terms`];
  each then dropped with `omission_rate` (at least one stays) and replaced by a parent or
  grandparent with `imprecision_rate` (never vaguer than depth 4, "Abnormal eye morphology");
- Poisson(`unannotated_rate`) of the syndrome's unannotated findings;
- Poisson(`noise_rate`) unrelated findings drawn by how often OMIM annotates them, outside
  the syndrome's annotations, their ancestors and descendants;
- Poisson(`negated_rate`) pertinent negatives: findings of a look-alike that this patient
  lacks ("There is no hypertelorism.");
- a note of a few sentences from varied templates and wordings (`hpo_sim.wordings`);
- a gestalt vector: centroid + `gestalt_noise` x isotropic noise, both of expected norm 1,
  a stand-in for a GestaltMatcher face embedding; large `gestalt_noise` makes it useless.

The defaults are calibrated (experiments/rare_disease_data.py) so that the HPO-overlap
ranker is far from perfect, text alone leaves headroom and the face adds 10+ points top-1.

`Sample.meta` holds the truth for analysis (OMIM id, the HPO ids the note states and
negates, age, sex). Baselines and students must read only `Sample.text`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mint.data import hpo_sim
from mint.data.task_data import Sample, TaskData, stratified_split

# Names that describe rather than name a syndrome ("Intellectual developmental disorder,
# autosomal recessive 46") make unreadable, near-identical labels.
_DESCRIPTIVE_PREFIXES = (
    "intellectual developmental disorder",
    "neurodevelopmental disorder",
    "chromosome",
    "developmental and epileptic encephalopathy",
    "congenital disorder of glycosylation",
)
_NAMED_ENTITY_WORDS = ("syndrome", "dysplasia", "disease")
_MAX_NAME_CHARS = 60
_NAME_RATIO_LIMIT = 0.8  # evaluation's difflib threshold: chosen names must stay below it
_X_LINKED_RECESSIVE = 1419  # HP:0001419
# All (0) > Phenotypic abnormality (1) > Abnormality of the eye (2) > Abnormal eye morphology (3):
# an imprecise mention is at least one level more specific than that.
_MIN_IMPRECISE_DEPTH = 4

_OPENINGS = (
    "{A_age} {noun} was referred to the genetics clinic with {items}.",
    "{Age} {noun} presenting with {items}.",
    "The patient is {a_age} {noun} evaluated for {items}.",
    "We saw this {age} {noun} because of {items}.",
    "{Pron} is {a_age} {noun} with a history of {items}.",
)
_FINDINGS = (
    "On examination we noted {items}.",
    "Physical examination revealed {items}.",
    "Dysmorphology assessment showed {items}.",
    "{Pron} also has {items}.",
    "The parents report {items}.",
    "Additional findings include {items}.",
    "{Poss} history is notable for {items}.",
)
_NEGATIVES = (
    "There is no {item}.",
    "No {item} noted.",
    "{Pron} does not have {item}.",
)
_FILLERS = (
    "Family history is unremarkable.",
    "Pregnancy and delivery were uneventful.",
    "The parents are healthy and unrelated.",
    "Genetic testing is pending.",
    "A chromosomal microarray was normal.",
)


@dataclass(frozen=True)
class Syndrome:
    omim_id: int
    omim_name: str
    name: str  # the label: the OMIM name without its subtype number
    terms: tuple[int, ...]  # annotated terms under "Phenotypic abnormality", sorted
    x_linked_recessive: bool


@dataclass(frozen=True)
class _Profile:
    """What the panel fixes about a syndrome beyond its annotations."""

    annotated: frozenset[int]
    known: frozenset[int]  # annotated terms and their ancestors
    weights: np.ndarray  # sampling weight of each annotated term
    unannotated: tuple[int, ...]  # findings of the syndrome that OMIM does not list
    lookalike_terms: tuple[int, ...]  # look-alikes' findings it lacks: pertinent negatives
    centroid: np.ndarray  # facial-gestalt mean, float64 [gestalt_dim]


@functools.cache
def syndrome_pool(*, min_terms: int = 12, min_facial_terms: int = 4) -> tuple[Syndrome, ...]:
    """Craniofacial OMIM syndromes with readable names, one per numbered series, by OMIM id."""
    families: dict[str, list[Syndrome]] = {}
    for disease in hpo_sim.ontology().omim_diseases:
        name = disease.name
        lowered = name.lower()
        if (
            len(name) > _MAX_NAME_CHARS
            or lowered.startswith(_DESCRIPTIVE_PREFIXES)
            or not any(w in lowered for w in _NAMED_ENTITY_WORDS)
            or "'" in name  # answers quote names ('Disease1'): "O'Donnell-..." would break them
        ):
            continue
        terms = tuple(sorted(t for t in disease.hpo if hpo_sim.is_phenotypic(t)))
        facial = [t for t in terms if hpo_sim.FACE in hpo_sim.ancestors(t)]
        if len(terms) < min_terms or len(facial) < min_facial_terms:
            continue
        syndrome = Syndrome(
            omim_id=int(disease.id),
            omim_name=name,
            name=hpo_sim.strip_subtype(name),
            terms=terms,
            x_linked_recessive=_X_LINKED_RECESSIVE in disease.hpo,
        )
        families.setdefault(hpo_sim.family_key(name), []).append(syndrome)
    # The best-annotated member stands for its series (ties: the older OMIM entry).
    chosen = [max(members, key=lambda s: (len(s.terms), -s.omim_id)) for members in families.values()]
    return tuple(sorted(chosen, key=lambda s: s.omim_id))


def profile_similarity(pool: tuple[Syndrome, ...]) -> np.ndarray:
    """Cosine between IC-weighted, ancestor-propagated annotation profiles [len(pool)]^2."""
    closures = [hpo_sim.closure(s.terms) for s in pool]
    vocab = {t: i for i, t in enumerate(sorted(set().union(*closures)))}
    ic = np.array([hpo_sim.information_content(t) for t in vocab], dtype=np.float32)
    matrix = np.zeros((len(pool), len(vocab)), dtype=np.float32)
    for row, terms in enumerate(closures):
        matrix[row, [vocab[t] for t in terms]] = 1.0
    matrix *= ic
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix @ matrix.T


def choose_panel(
    n_diseases: int,
    *,
    lookalike_group_size: int,
    max_similarity: float,
    rng: np.random.Generator,
    pool: tuple[Syndrome, ...],
) -> list[list[Syndrome]]:
    """Look-alike groups: a random syndrome and its nearest name-distinct neighbours."""
    similarity = profile_similarity(pool)
    chosen: list[int] = []

    def distinct(j: int) -> bool:
        return all(hpo_sim.name_similarity(pool[j].name, pool[c].name) < _NAME_RATIO_LIMIT for c in chosen)

    groups: list[list[Syndrome]] = []
    for first in rng.permutation(len(pool)):
        if len(chosen) == n_diseases:
            break
        if not distinct(first):
            continue
        group = [int(first)]
        chosen.append(int(first))
        # Above max_similarity two entries are the same disease under two names (allelic
        # OMIM entries): no note could tell them apart, so they are not look-alikes.
        for j in np.argsort(-similarity[first], kind="stable"):
            if len(group) == lookalike_group_size or len(chosen) == n_diseases:
                break
            if j not in chosen and similarity[first, j] <= max_similarity and distinct(j):
                group.append(int(j))
                chosen.append(int(j))
        groups.append([pool[i] for i in group])
    if len(chosen) < n_diseases:
        raise ValueError(
            f"only {len(chosen)} name-distinct craniofacial syndromes are available, "
            f"{n_diseases} were asked for: lower n_diseases or min_terms/min_facial_terms"
        )
    return groups


def _descends_from_any(term: int, terms: frozenset[int]) -> bool:
    return bool(hpo_sim.ancestors(term) & terms)


def _related(term: int, annotated: frozenset[int], annotated_closure: frozenset[int]) -> bool:
    """The term is annotated, an ancestor of an annotation, or more specific than one."""
    return term in annotated_closure or _descends_from_any(term, annotated)


def _unannotated_candidates(syndrome: Syndrome) -> list[int]:
    """Siblings of annotated terms: findings near the known phenotype that OMIM omits."""
    annotated = frozenset(syndrome.terms)
    known = hpo_sim.closure(annotated)
    siblings = {c for t in syndrome.terms for p in hpo_sim.parents(t) for c in hpo_sim.children(p)}
    return sorted(t for t in siblings if hpo_sim.is_phenotypic(t) and not _related(t, annotated, known))


def _build_profiles(
    groups: list[list[Syndrome]],
    *,
    frequency_spread: float,
    specificity_bias: float,
    unannotated_per_syndrome: int,
    gestalt_dim: int,
    rng: np.random.Generator,
) -> dict[int, _Profile]:
    profiles: dict[int, _Profile] = {}
    for group in groups:
        for syndrome in group:
            annotated = frozenset(syndrome.terms)
            known = hpo_sim.closure(annotated)
            candidates = _unannotated_candidates(syndrome)
            n_extra = min(unannotated_per_syndrome, len(candidates))
            unannotated = tuple(sorted(rng.choice(candidates, size=n_extra, replace=False).tolist()))
            # Generic findings (low IC: developmental delay, short stature) are the ones
            # most patients show and notes record; pathognomonic ones are rarer.
            specificity = np.exp(
                -specificity_bias * np.array([hpo_sim.information_content(t) for t in syndrome.terms])
            )
            mates = {t for other in group if other is not syndrome for t in other.terms}
            lookalike = tuple(sorted(t for t in mates if not _related(t, annotated, known)))
            profiles[syndrome.omim_id] = _Profile(
                annotated=annotated,
                known=known,
                weights=rng.lognormal(0.0, frequency_spread, size=len(syndrome.terms)) * specificity,
                unannotated=unannotated,
                lookalike_terms=lookalike,
                centroid=rng.standard_normal(gestalt_dim) / np.sqrt(gestalt_dim),
            )
    return profiles


@functools.cache
def _background_terms() -> tuple[np.ndarray, np.ndarray]:
    """Every phenotypic term OMIM uses and the cumulative probability of drawing it as noise
    (proportional to how many OMIM diseases list it: common findings are common noise)."""
    counts: dict[int, int] = {}
    for disease in hpo_sim.ontology().omim_diseases:
        for t in disease.hpo:
            counts[t] = counts.get(t, 0) + 1
    terms = np.array(sorted(t for t in counts if hpo_sim.is_phenotypic(t)))
    freq = np.array([counts[t] for t in terms], dtype=np.float64)
    return terms, np.cumsum(freq) / freq.sum()


def _imprecise(term: int, rng: np.random.Generator) -> int:
    """A parent or grandparent, never as vague as "Abnormal eye physiology" (depth < 4)."""
    current = term
    for _ in range(int(rng.integers(1, 3))):
        options = [p for p in hpo_sim.parents(current) if hpo_sim.depth(p) >= _MIN_IMPRECISE_DEPTH]
        if not options:
            break
        current = int(rng.choice(options))
    return current


def _draw_findings(
    syndrome: Syndrome,
    profile: _Profile,
    *,
    term_fraction: tuple[float, float],
    min_annotated_terms: int,
    max_annotated_terms: int,
    omission_rate: float,
    imprecision_rate: float,
    unannotated_rate: float,
    noise_rate: float,
    negated_rate: float,
    sex: str,
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """(stated findings in note order, negated findings), none of another sex's anatomy."""
    fits = np.array([hpo_sim.fits_sex(t, sex) for t in syndrome.terms])
    weights = profile.weights * fits if fits.any() else profile.weights
    k = int(round(rng.uniform(*term_fraction) * len(syndrome.terms)))
    k = min(max(k, min_annotated_terms), max_annotated_terms, int(np.count_nonzero(weights)))
    drawn = rng.choice(syndrome.terms, size=k, replace=False, p=weights / weights.sum())
    kept = [int(t) for t in drawn if rng.random() >= omission_rate] or [int(drawn[0])]
    stated = [_imprecise(t, rng) if rng.random() < imprecision_rate else t for t in kept]

    unannotated = [t for t in profile.unannotated if hpo_sim.fits_sex(t, sex)]
    n_extra = min(int(rng.poisson(unannotated_rate)), len(unannotated))
    stated += [int(t) for t in rng.choice(unannotated, size=n_extra, replace=False)] if n_extra else []

    background, cumulative = _background_terms()
    n_noise = int(rng.poisson(noise_rate))
    while n_noise > 0:
        t = int(background[min(np.searchsorted(cumulative, rng.random()), len(background) - 1)])
        if not _related(t, profile.annotated, profile.known) and t not in stated and hpo_sim.fits_sex(t, sex):
            stated.append(t)
            n_noise -= 1

    stated = list(dict.fromkeys(stated))
    rng.shuffle(stated)
    candidates = [t for t in profile.lookalike_terms if t not in stated and hpo_sim.fits_sex(t, sex)]
    n_negated = min(int(rng.poisson(negated_rate)), len(candidates))
    negated = [int(t) for t in rng.choice(candidates, size=n_negated, replace=False)] if n_negated else []
    return stated, negated


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    # rng.choice would first copy the strings into a numpy array, once per word
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _age_phrase(age_years: float) -> str:
    if age_years < 2.0:
        return f"{max(int(age_years * 12), 1)}-month-old"
    return f"{int(age_years)}-year-old"


def _with_article(phrase: str) -> str:
    # "an 8-year-old", "an 11-month-old", "an 18-year-old"; "a 1-year-old"
    spoken_vowel = phrase.startswith("8") or phrase.split("-")[0] in ("11", "18")
    return f"{'an' if spoken_vowel else 'a'} {phrase}"


def _person_noun(age_years: float, sex: str) -> str:
    if age_years < 1.0:
        return f"{sex} infant"
    if age_years < 18.0:
        return "boy" if sex == "male" else "girl"
    return "man" if sex == "male" else "woman"


def _distinct_wordings(terms: list[int], rng: np.random.Generator) -> list[str]:
    """One wording per term, avoiding one already used in the note: brachydactyly and short
    finger may both be stated, but not as "short fingers and short fingers"."""
    used: set[str] = set()
    out = []
    for t in terms:
        options = hpo_sim.wordings(t)
        fresh = [w for w in options if w.rstrip("s") not in used] or list(options)
        word = fresh[int(rng.integers(len(fresh)))]
        used.add(word.rstrip("s"))
        out.append(word)
    return out


def render_note(
    stated: list[int], negated: list[int], *, age_years: float, sex: str, rng: np.random.Generator
) -> str:
    """A short clinical note: an opening with age and sex, findings in 1-3-item sentences,
    pertinent negatives, sometimes an uninformative remark."""
    words = _distinct_wordings(stated, rng)
    pron, poss = ("he", "his") if sex == "male" else ("she", "her")
    fields = {
        "age": _age_phrase(age_years),
        "a_age": _with_article(_age_phrase(age_years)),
        "A_age": _capitalize(_with_article(_age_phrase(age_years))),
        "Age": _capitalize(_age_phrase(age_years)),
        "noun": _person_noun(age_years, sex),
        "Pron": _capitalize(pron),
        "Poss": _capitalize(poss),
    }
    n_open = int(rng.integers(1, 3))
    sentences = [_pick(_OPENINGS, rng).format(items=_join(words[:n_open]), **fields)]
    rest = words[n_open:]
    # parents speak for children only; no template twice in a row
    usable = [t for t in _FINDINGS if age_years < 18.0 or "parents" not in t]
    templates = [usable[i] for i in rng.permutation(len(usable))]
    while rest:
        size = int(rng.integers(1, 4))
        template = templates[len(sentences) % len(templates)]
        sentences.append(template.format(items=_join(rest[:size]), **fields))
        rest = rest[size:]
    for t in negated:
        item = _pick(hpo_sim.wordings(t), rng)
        sentences.append(_pick(_NEGATIVES, rng).format(item=item, **fields))
    if rng.random() < 0.5:
        sentences.append(_pick(_FILLERS, rng))
    return " ".join(sentences)


def simulate_rare_disease(
    *,
    n_diseases: int = 30,
    patients_per_disease: int = 40,
    seed: int = 0,
    panel_seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    lookalike_group_size: int = 6,
    max_similarity: float = 0.9,
    min_terms: int = 12,
    min_facial_terms: int = 4,
    term_fraction: tuple[float, float] = (0.25, 0.4),
    min_annotated_terms: int = 2,
    max_annotated_terms: int = 4,
    frequency_spread: float = 1.0,
    specificity_bias: float = 1.5,
    omission_rate: float = 0.1,
    imprecision_rate: float = 0.5,
    unannotated_per_syndrome: int = 4,
    unannotated_rate: float = 0.8,
    noise_rate: float = 1.5,
    negated_rate: float = 0.4,
    gestalt_dim: int = 64,
    gestalt_noise: float = 3.0,
) -> TaskData:
    """The simulated rare-disease task (see the module docstring for the generative model).

    `panel_seed` fixes the syndromes and their profiles; `seed` the patients and the split.
    """
    pool = syndrome_pool(min_terms=min_terms, min_facial_terms=min_facial_terms)
    panel_rng = np.random.default_rng(panel_seed)
    groups = choose_panel(
        n_diseases,
        lookalike_group_size=lookalike_group_size,
        max_similarity=max_similarity,
        rng=panel_rng,
        pool=pool,
    )
    profiles = _build_profiles(
        groups,
        frequency_spread=frequency_spread,
        specificity_bias=specificity_bias,
        unannotated_per_syndrome=unannotated_per_syndrome,
        gestalt_dim=gestalt_dim,
        rng=panel_rng,
    )
    syndromes = sorted((s for g in groups for s in g), key=lambda s: s.name.lower())
    labels = [s.name for s in syndromes]

    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for label, syndrome in enumerate(syndromes):
        profile = profiles[syndrome.omim_id]
        for patient in range(patients_per_disease):
            age = float(np.clip(rng.lognormal(np.log(5.0), 1.0), 0.1, 50.0))
            sex = "male" if rng.random() < (0.9 if syndrome.x_linked_recessive else 0.5) else "female"
            stated, negated = _draw_findings(
                syndrome,
                profile,
                term_fraction=term_fraction,
                min_annotated_terms=min_annotated_terms,
                max_annotated_terms=max_annotated_terms,
                omission_rate=omission_rate,
                imprecision_rate=imprecision_rate,
                unannotated_rate=unannotated_rate,
                noise_rate=noise_rate,
                negated_rate=negated_rate,
                sex=sex,
                rng=rng,
            )
            note = render_note(stated, negated, age_years=age, sex=sex, rng=rng)
            noise = rng.standard_normal(gestalt_dim) / np.sqrt(gestalt_dim)
            samples.append(
                Sample(
                    id=f"omim{syndrome.omim_id}-p{patient:03d}",
                    label=label,
                    text=note,
                    vector=(profile.centroid + gestalt_noise * noise).astype(np.float32),
                    meta={
                        "omim_id": syndrome.omim_id,
                        "omim_name": syndrome.omim_name,
                        "age_years": round(age, 1),
                        "sex": sex,
                        "hpo_ids": [hpo_sim.hpo_id(t) for t in stated],
                        "negated_hpo_ids": [hpo_sim.hpo_id(t) for t in negated],
                    },
                )
            )
    split_index = stratified_split([s.label for s in samples], split_fractions, seed)
    splits = {split: [samples[i] for i in idx] for split, idx in split_index.items()}
    return TaskData(name="rare_disease", labels=labels, splits=splits)
