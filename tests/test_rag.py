"""optim=rag: chunking, retrieval with a cutoff, prompt augmentation, a training-only knowledge base, a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mint.stages.evaluate
from mint.data.tissue import simulate_tissue
from mint.leakage import LeakageError
from mint.rag import (
    KnowledgeBase,
    Passage,
    RagSettings,
    augment_prompt,
    check_no_leakage,
    chunk_units,
    knowledge_base,
    retrieve,
    retrieve_for,
)
from mint.rag.embed import embed_texts
from mint.run import run

TEMPLATE = "Knowledge:\n{passages}\n\n{user}"


def settings(**changes) -> RagSettings:
    base = dict(
        top_k=3,
        text_cutoff=0.0,
        image_cutoff=0.0,
        chunk_tokens=64,
        chunk_overlap=8,
        text_max_length=256,
        template=TEMPLATE,
    )
    return RagSettings(**(base | changes))


def test_minilm_retrieval_finds_the_passage_about_the_described_condition():
    passages = [
        "Marfan syndrome: tall stature, very long fingers, dislocated lens of the eye, aortic dilatation.",
        "Down syndrome: upslanting eyes, single palmar crease, intellectual disability, heart defect.",
        "Achondroplasia: short arms and legs, large head with frontal bossing, trident hand.",
        "Neurofibromatosis type 1: cafe-au-lait spots, freckles in the armpits, neurofibromas.",
    ]
    kb = embed_texts(passages, max_length=256)
    queries = embed_texts(
        [
            "A tall teenager with very long fingers whose eye lens is dislocated.",
            "The child has many cafe-au-lait spots and freckling in both armpits.",
            "Short-limbed infant with a large head and a prominent forehead.",
        ],
        max_length=256,
    )
    hits = retrieve(kb, queries, top_k=2, cutoff=-1.0)
    assert [row[0].index for row in hits] == [0, 3, 2]
    assert all(len(row) == 2 and row[0].score >= row[1].score for row in hits)


def test_the_cutoff_drops_weak_passages_and_top_k_caps_the_rest():
    embeddings = np.eye(3, dtype=np.float32)
    query = np.array([[0.9, 0.4, 0.1]], dtype=np.float32)
    query /= np.linalg.norm(query)
    strong, medium, weak = (float(s) for s in query[0])

    assert [h.index for h in retrieve(embeddings, query, top_k=3, cutoff=-1.0)[0]] == [0, 1, 2]
    kept = retrieve(embeddings, query, top_k=3, cutoff=0.3)[0]
    assert [h.index for h in kept] == [0, 1] and kept[1].score == pytest.approx(medium)
    assert weak < 0.3 <= medium < strong
    assert [h.index for h in retrieve(embeddings, query, top_k=1, cutoff=0.0)[0]] == [0]
    assert retrieve(embeddings, query, top_k=3, cutoff=0.99)[0] == []
    with pytest.raises(ValueError, match="optim.rag.top_k"):
        retrieve(embeddings, query, top_k=0, cutoff=0.0)


def test_chunks_break_between_units_fit_the_budget_overlap_and_cover_everything():
    units = [f"term{i} word" for i in range(12)]  # 2 "tokens" each

    def words(text: str) -> int:
        return len(text.split())

    chunks = chunk_units(
        units, prefix="Disease X: ", joiner=", ", count_tokens=words, max_tokens=10, overlap_tokens=2
    )
    assert all(c.startswith("Disease X: ") and words(c) <= 10 for c in chunks)
    bodies = [c.removeprefix("Disease X: ").split(", ") for c in chunks]
    assert all(set(b) <= set(units) for b in bodies)  # no unit was cut
    assert set().union(*map(set, bodies)) == set(units)
    for before, after in zip(bodies, bodies[1:], strict=False):
        assert before[-1] == after[0]  # one 2-token unit fits the overlap
    with pytest.raises(ValueError, match="optim.rag.chunk_overlap"):
        chunk_units(units, prefix="", joiner=" ", count_tokens=words, max_tokens=4, overlap_tokens=4)


def test_passages_go_into_the_user_turn_of_text_and_vision_prompts():
    passages = [
        Passage("Marfan syndrome: tall stature.", "Marfan syndrome"),
        Passage("Down syndrome: ...", "Down"),
    ]
    text_prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "the note"}]
    augmented = augment_prompt(text_prompt, passages, TEMPLATE)
    assert augmented[0] == text_prompt[0]
    assert augmented[1]["content"] == (
        "Knowledge:\n[1] Marfan syndrome: tall stature.\n[2] Down syndrome: ...\n\nthe note"
    )
    assert text_prompt[1]["content"] == "the note"  # the original is not modified

    vision_prompt = [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which tissue?"}]},
    ]
    parts = augment_prompt(vision_prompt, passages[:1], TEMPLATE)[1]["content"]
    assert parts[0] == {"type": "image"}
    assert parts[1]["text"].startswith("Knowledge:\n[1] Marfan") and parts[1]["text"].endswith(
        "Which tissue?"
    )

    assert augment_prompt(text_prompt, [], TEMPLATE) == text_prompt  # nothing retrieved, nothing added
    with pytest.raises(ValueError, match="optim.rag.template must contain"):
        augment_prompt(text_prompt, passages, "Knowledge: {passages}")


def test_tissue_knowledge_base_holds_training_images_only_and_is_cached(tmp_path):
    task = simulate_tissue(n_per_tissue=5, seed=3)
    kb = knowledge_base(task, settings(), tmp_path)
    train = {s.id for s in task.splits["train"]}
    assert kb.modality == "image" and kb.sample_ids() == train
    assert len(kb.passages) == len(train)
    assert all(p.text.startswith(f"A training image of {p.label} tissue: ") for p in kb.passages)
    entries = list((tmp_path / "rag").iterdir())
    assert len(entries) == 1
    again = knowledge_base(task, settings(top_k=1), tmp_path)  # query-time settings: same entry
    assert list((tmp_path / "rag").iterdir()) == entries
    assert np.array_equal(again.embeddings, kb.embeddings)

    # A training image retrieves itself first: the image embedding is a function of the pixels.
    first = task.splits["train"][:4]
    hits = retrieve_for(kb, first, settings(top_k=1, image_cutoff=0.999))
    assert [kb.passages[row[0].index].sample_ids[0] for row in hits] == [s.id for s in first]


def test_a_knowledge_base_holding_a_held_out_sample_is_refused():
    task = simulate_tissue(n_per_tissue=3, seed=4)
    test_id = task.splits["test"][0].id
    leaky = KnowledgeBase(
        [Passage("A training image of Colon tissue: ...", "Colon", (test_id,))],
        np.ones((1, 2), np.float32) / np.sqrt(2),
        "image",
        source_ids=[s.id for s in task.splits["train"]],
    )
    with pytest.raises(LeakageError, match=f"RAG knowledge base contains 1 test sample.*{test_id}"):
        check_no_leakage(leaky, task)


def test_chunks_longer_than_the_encoder_input_are_a_config_error():
    with pytest.raises(ValueError, match="optim.rag.chunk_tokens=300 exceeds optim.rag.text_max_length"):
        RagSettings.from_config(settings(chunk_tokens=300).__dict__)
    with pytest.raises(ValueError, match="optim=rag needs optim.rag"):
        RagSettings.from_config(None)


def test_rag_run_on_rare_disease_retrieves_disease_profiles_into_the_prompts(make_cfg, tmp_path, monkeypatch):
    seen_prompts = []
    real_generate = mint.stages.evaluate.generate_answers

    def capture(model, tokenizer, prompts, *args, **kwargs):
        seen_prompts.extend(prompts)
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(mint.stages.evaluate, "generate_answers", capture)
    cfg = make_cfg("task=rare_disease", "optim=rag", "debug=smoke", "optim.rag.text_cutoff=0.3")
    results = run(cfg)

    assert {
        "test/format_valid",
        "test/top1",
        "test/topk",
        "test/rank_top1",
        "rag/kb_passages",
    } <= results.keys()
    assert 0.0 <= results["test/top1"] <= results["test/topk"] <= 1.0
    assert results["rag/test/passages_per_prompt"] > 0
    assert not (tmp_path / "run" / "student" / "adapter").exists()  # nothing was trained

    predictions = [
        json.loads(line)
        for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == len(seen_prompts) == 8
    for prediction, prompt in zip(predictions, seen_prompts, strict=True):
        user = prompt[-1]["content"]
        assert len(prediction["retrieved"]) <= 3
        for i, hit in enumerate(prediction["retrieved"], start=1):
            assert hit["score"] >= 0.3
            assert f"[{i}] {hit['label']}: " in user  # the passage about that disease is in the prompt
        if prediction["retrieved"]:
            assert user.startswith("Reference knowledge")


def test_rag_on_a_task_without_training_data_is_a_clear_error(make_cfg):
    with pytest.raises(ValueError, match="optim=rag needs a pipeline task"):
        run(make_cfg("task=example", "optim=rag", "debug=smoke"))


def _strings(value) -> list[str]:
    """Every string inside a prompt (message lists, content parts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def test_rag_run_on_tissue_augments_the_vision_prompts(make_cfg, tmp_path, monkeypatch):
    """Each test image's prompt, as generation receives it, holds the text of every passage
    retrieved for it (and still the image)."""
    seen_prompts, kbs = [], []
    real_generate, real_kb = mint.stages.evaluate.generate_answers, mint.stages.evaluate.knowledge_base

    def capture(model, processor, prompts, *args, **kwargs):
        seen_prompts.extend(prompts)
        return real_generate(model, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(mint.stages.evaluate, "generate_answers", capture)
    monkeypatch.setattr(mint.stages.evaluate, "knowledge_base", lambda *a: kbs.append(real_kb(*a)) or kbs[-1])
    results = run(make_cfg("task=tissue", "optim=rag", "debug=smoke"))
    # rank_*: the augmented prompt is longer than training's max_length, and scoring still runs
    keys = {"test/format_valid", "test/top1", "test/topk", "test/rank_top1", "rag/kb_passages"}
    assert keys <= results.keys()
    assert results["rag/test/passages_per_prompt"] > 0
    predictions = [
        json.loads(line)
        for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    (kb,) = kbs
    assert len(predictions) == len(seen_prompts) > 0
    for prediction, prompt in zip(predictions, seen_prompts, strict=True):
        text = "\n".join(_strings(prompt))
        assert {"type": "image"} in prompt[-1]["content"]
        for hit in prediction["retrieved"]:
            assert kb.passages[hit["passage"]].text in text


def test_a_leak_planted_in_the_knowledge_base_of_a_run_stops_it(make_cfg, monkeypatch):
    """The knowledge base a run builds gets one test sample among its sources: the run stops with
    a LeakageError naming it, before any prompt is answered, and writes no results."""
    import dataclasses

    import mint.rag.stage

    real_build, planted = mint.rag.stage._build, []

    def leaky_build(task, settings):
        kb = real_build(task, settings)
        planted.append(task.splits["test"][0].id)
        return dataclasses.replace(kb, source_ids=[*kb.source_ids, planted[0]])

    monkeypatch.setattr(mint.rag.stage, "_build", leaky_build)
    # chunk_overlap=7: a cache key of this test's own, so the leaky entry is built here (and no
    # other test reads it); the session's teacher is reused
    cfg = make_cfg("task=rare_disease", "optim=rag", "debug=smoke", "optim.rag.chunk_overlap=7")
    with pytest.raises(LeakageError, match="RAG knowledge base contains 1 test sample"):
        run(cfg)
    assert planted and not (Path(cfg.paths.output_dir) / "results.json").exists()
    assert not (Path(cfg.paths.output_dir) / "eval" / "predictions.jsonl").exists()
