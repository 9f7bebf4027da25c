"""The answer parser on hand-written answers: what students really produce."""

import pytest

from mint.names import normalize_name
from mint.prefs.formats import AnswerFormat, match_label

TISSUES = ["Adrenal Glands", "Bile Duct", "Bladder", "Breast", "Cervix", "Colon", "Head & Neck"]
FMT = AnswerFormat(header="MOST_LIKELY_TISSUE:", n=3)


def test_render_then_parse_round_trips():
    text = FMT.render(["Breast", "Head & Neck", "Colon"])
    assert text == "MOST_LIKELY_TISSUE:\n1. 'Breast'\n2. 'Head & Neck'\n3. 'Colon'"
    parsed = FMT.parse(text, TISSUES)
    assert parsed.ranked_labels() == ["Breast", "Head & Neck", "Colon"]
    assert FMT.is_valid(parsed)


def test_render_refuses_the_wrong_count():
    with pytest.raises(ValueError, match="lists 3 names, got 2"):
        FMT.render(["Breast", "Colon"])


def test_misspelt_names_match_within_the_paper_threshold():
    parsed = FMT.parse("MOST_LIKELY_TISSUE:\n1. 'Brest'\n2. 'head and neck'\n3. 'Colonn'", TISSUES)
    assert parsed.matched == ["Breast", "Head & Neck", "Colon"]  # ratios 0.91, 0.82, 0.91
    assert FMT.is_valid(parsed)
    far = FMT.parse("MOST_LIKELY_TISSUE:\n1. 'Brst tissue'\n2. 'Neck'\n3. 'Colon'", TISSUES)
    assert far.matched == [None, None, "Colon"] and not FMT.is_valid(far)
    assert match_label("Bile-duct", TISSUES) == "Bile Duct"
    assert normalize_name("Head & Neck") == "head neck"
    assert normalize_name("Smith-Lemli-Opitz  Syndrome", punctuation="") == "smithlemliopitz syndrome"


def test_extra_prose_around_the_list_is_ignored():
    text = (
        "Looking at the nuclei, I think:\nMOST_LIKELY_TISSUE:\n1) Breast\n2) Colon\n3) Cervix\n"
        "These are ranked by likelihood.\n4. 'Bladder'"
    )
    parsed = FMT.parse(text, TISSUES)
    assert parsed.ranked_labels() == ["Breast", "Colon", "Cervix"]
    assert FMT.is_valid(parsed)


def test_wrong_count_duplicates_missing_header_and_empty_are_invalid():
    too_few = FMT.parse("MOST_LIKELY_TISSUE:\n1. 'Breast'\n2. 'Colon'", TISSUES)
    assert not FMT.is_valid(too_few) and too_few.ranked_labels() == ["Breast", "Colon"]

    duplicates = FMT.parse("MOST_LIKELY_TISSUE:\n1. 'Breast'\n2. 'breast'\n3. 'Colon'", TISSUES)
    assert not FMT.is_valid(duplicates) and duplicates.ranked_labels() == ["Breast", "Colon"]

    headless = FMT.parse("1. 'Breast'\n2. 'Colon'\n3. 'Cervix'", TISSUES)
    assert not headless.has_header and not FMT.is_valid(headless)
    assert headless.ranked_labels() == ["Breast", "Colon", "Cervix"]  # still counts for top-k

    empty = FMT.parse("", TISSUES)
    assert empty.items == [] and empty.ranked_labels() == [] and not FMT.is_valid(empty)


def test_unknown_names_do_not_match():
    parsed = FMT.parse("MOST_LIKELY_TISSUE:\n1. 'Spleen'\n2. 'Breast'\n3. 'Colon'", TISSUES)
    assert parsed.matched[0] is None and parsed.ranked_labels() == ["Breast", "Colon"]
