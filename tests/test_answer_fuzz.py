"""The answer parser, fuzzed (hypothesis): whatever a student writes, parsing never raises, and a
well-formed answer always round-trips, whatever prose or case surrounds it."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mint.names import normalize_name
from mint.prefs.formats import AnswerFormat

FORMATS = [AnswerFormat("POTENTIAL_DISEASES:", n=3), AnswerFormat("MOST_LIKELY_TISSUE:", n=2)]
# Label names as a task could have them: words, digits, inner punctuation ("Head & Neck",
# "Crohn's disease", "X-linked"); no quote or bullet at either end and no line break.
WORD = st.text(alphabet=string.ascii_letters + string.digits, min_size=2, max_size=10)
NAME = st.lists(WORD, min_size=1, max_size=4).map(" ".join) | st.tuples(
    WORD, st.sampled_from("&'-/,"), WORD
).map(lambda t: f"{t[0]}{t[1]} {t[2]}" if t[1] in "&," else "".join(t))
# Text a student might write: anything, with the header, list markers and quotes made likely.
PIECES = [
    *string.printable,
    "İ",
    "İİ",
    "İİİ",
    "ß",
    "ﬁ",
    "\u2028",
    "•",
    "'",
    "1. ",
    "\n2) ",
    "POTENTIAL_DISEASES:",
]
NOISE = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(text=st.text(max_size=400) | NOISE, labels=st.lists(NAME, min_size=1, max_size=8))
def test_parsing_never_raises_and_validity_is_a_bool(text, labels):
    for fmt in FORMATS:
        parsed = fmt.parse(text, labels)
        assert isinstance(fmt.is_valid(parsed), bool)
        assert len(parsed.items) == len(parsed.matched)
        assert set(parsed.ranked_labels()) <= set(labels)


@FUZZ
@given(
    names=st.lists(NAME, min_size=3, max_size=3, unique_by=normalize_name),
    before=NOISE.filter(lambda t: "POTENTIAL_DISEASES" not in t.upper()),
    after=st.sampled_from(["", "\n", "\n\nThese are my best guesses.", "\nI hope this helps!"]),
    upper=st.booleans(),
)
def test_a_well_formed_answer_round_trips_whatever_surrounds_it(names, before, after, upper):
    fmt = FORMATS[0]
    answer = fmt.render(names)
    if upper:
        answer = answer.replace(fmt.header, fmt.header.lower())  # the header in another case
    labels = names + ["Unrelated syndrome"]
    parsed = fmt.parse(f"{before}\n{answer}{after}", labels)
    assert parsed.items == names
    assert parsed.matched == names
    assert fmt.is_valid(parsed)


def test_a_header_after_text_whose_lowercase_is_longer_is_found_where_it_is():
    """Lower-casing 'İ' gives two characters: an index into the lowered text would land in the list."""
    fmt = FORMATS[1]
    parsed = fmt.parse("İİİİ MOST_LIKELY_TISSUE:\n1. 'Breast'\n2. 'Colon'", ["Breast", "Colon"])
    assert parsed.items == ["Breast", "Colon"] and fmt.is_valid(parsed)
