"""Generation settings: the `generation` node reaches transformers' GenerationConfig key for key,
the model's own end ids are kept, bad keys stop a run at start, sampling repeats for a seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mint.commands.trained import TrainedRun
from mint.config import ConfigError
from mint.data.example_prefs import make_example_prefs
from mint.eval.constraints import NoRepeatedNames
from mint.eval.generate import (
    GREEDY,
    DecodingSettings,
    check_generation,
    end_of_turn_id,
    end_token_ids,
    generate_answers,
    generation_config,
)
from mint.pairs.rows import pairs_to_texts
from mint.stages.evaluate import eval_job, generation_node
from mint.student import build_tiny_llama, load_student
from mint.student.tiny import train_tokenizer

ROWS = make_example_prefs(n=24, seed=1)
PROMPTS = [row["prompt"] for row in ROWS[:4]]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    model, tokenizer = load_student(
        None,
        cache_dir=str(tmp_path_factory.mktemp("gen")),
        build=build_tiny_llama,
        corpus=pairs_to_texts(ROWS),
    )
    return model, tokenizer


def captured_generate(model, monkeypatch) -> list[dict]:
    """Record what each model.generate call receives (and still generate)."""
    calls: list[dict] = []
    real = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_the_config_node_reaches_the_generate_call(make_cfg, student, monkeypatch):
    model, tokenizer = student
    cfg = make_cfg(
        "task=rare_disease",
        "generation.repetition_penalty=1.3",
        "+generation.no_repeat_ngram_size=3",
        "+generation.min_new_tokens=2",
        "task.eval.max_new_tokens=7",
    )
    decoding = eval_job(cfg).decoding
    calls = captured_generate(model, monkeypatch)
    generate_answers(model, tokenizer, PROMPTS[:2], decoding, labels=["Alpha", "Beta"])
    config = calls[0]["generation_config"]
    assert (
        config.repetition_penalty == 1.3 and config.no_repeat_ngram_size == 3 and config.min_new_tokens == 2
    )
    assert config.do_sample is False and config.num_beams == 1  # greedy stays the default
    assert config.max_new_tokens == 7  # the task's length budget, unless the node sets one
    wider = DecodingSettings(generation={**GREEDY, "max_new_tokens": 3}, max_new_tokens=7)
    generate_answers(model, tokenizer, PROMPTS[:1], wider)
    assert calls[-1]["generation_config"].max_new_tokens == 3


def test_the_paper_choice_samples_with_the_papers_settings_per_task(make_cfg):
    rare = eval_job(make_cfg("task=rare_disease", "generation=paper")).decoding.generation
    tissue = eval_job(make_cfg("task=tissue", "generation=paper")).decoding.generation
    keys = ("do_sample", "temperature", "top_p", "top_k")
    assert [rare[k] for k in keys] == [True, 0.8, 0.8, 10]
    assert [tissue[k] for k in keys] == [True, 0.7, 0.6, 10]
    assert eval_job(make_cfg("task=tissue")).decoding.generation["do_sample"] is False
    assert eval_job(make_cfg("experiment=paper_rare_disease")).decoding.generation["temperature"] == 0.8
    # mint ask / mint export on a task=custom|example run (no task.eval) decode as its generation node
    example = TrainedRun(Path("run"), make_cfg("task=example", "generation=paper", "seed=5"), None, None)
    assert example.decoding().generation["temperature"] == 0.8 and example.decoding().seed == 5
    # A run folder from before the group kept its decoding in task.eval: ask/export still read it.
    old = OmegaConf.create(OmegaConf.to_container(make_cfg("task=rare_disease")))
    old.pop("generation")
    assert generation_node(old) == GREEDY
    old.task.eval.update(do_sample=True, temperature=0.8, top_p=0.8, top_k=10)
    assert generation_node(old) == {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 10}


def test_the_models_own_end_ids_and_the_end_of_turn_token_are_kept(student, monkeypatch):
    model, tokenizer = student
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end  # ChatML: what the template writes after an answer
    monkeypatch.setattr(model.generation_config, "eos_token_id", [5, im_end])  # e.g. Llama 3 lists several
    calls = captured_generate(model, monkeypatch)
    generate_answers(model, tokenizer, PROMPTS[:1], DecodingSettings(max_new_tokens=3))
    assert calls[0]["generation_config"].eos_token_id == [5, im_end]
    assert calls[0]["generation_config"].pad_token_id == tokenizer.pad_token_id

    # A Llama-3-style tokenizer: eos is <|end_of_text|>, the turn ends with <|eot_id|>.
    llama3 = train_tokenizer(["a b c"] * 4, vocab_size=280)
    llama3.add_special_tokens({"additional_special_tokens": ["<|end_of_text|>", "<|eot_id|>"]})
    llama3.eos_token = "<|end_of_text|>"
    llama3.chat_template = (
        "{% for m in messages %}{{ '<|start|>' + m['role'] + '\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}"
    )
    eot, eos = llama3.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    model_own = type("M", (), {"generation_config": type("G", (), {"eos_token_id": [7, eos]})()})()
    assert end_token_ids(model_own, llama3) == [7, eos, eot]
    config = generation_config(DecodingSettings(), model_own, llama3)
    assert config.eos_token_id == [7, eos, eot]


def test_a_bad_generation_key_or_value_is_an_error_naming_the_key(make_cfg):
    from mint.run import run

    with pytest.raises(ConfigError, match=r"generation\.temprature: .*did you mean generation\.temperature"):
        check_generation({"do_sample": True, "temprature": 0.7})
    with pytest.raises(ConfigError, match=r"generation\.temperature=-1\.0"):
        check_generation({"do_sample": True, "temperature": -1.0})
    with pytest.raises(ConfigError, match=r"generation\.top_p=1\.5"):
        check_generation({"do_sample": True, "top_p": 1.5})
    with pytest.raises(ConfigError, match="do_sample"):  # a sampling knob on greedy decoding
        check_generation({"do_sample": False, "temperature": 0.7})
    assert check_generation({"do_sample": True, "temperature": 0.7, "top_k": None}) == {
        "do_sample": True,
        "temperature": 0.7,
    }
    # From the command line: the run stops before any work.
    cfg = make_cfg("task=rare_disease", "+generation.repetition_penalti=1.2", "debug=smoke")
    with pytest.raises(
        ConfigError, match=r"generation\.repetition_penalti: .*generation\.repetition_penalty"
    ):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "teacher").exists()


def test_sampling_with_a_seed_repeats_and_another_seed_differs(student):
    model, tokenizer = student
    sampling = {"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 1.0}
    settings = DecodingSettings(generation=sampling, max_new_tokens=12, batch_size=2, seed=3)
    before = torch.random.get_rng_state()
    first = generate_answers(model, tokenizer, PROMPTS, settings)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left alone
    torch.manual_seed(123)  # whatever ran before does not matter
    assert generate_answers(model, tokenizer, PROMPTS, settings) == first
    other = DecodingSettings(generation=sampling, max_new_tokens=12, batch_size=2, seed=4)
    assert generate_answers(model, tokenizer, PROMPTS, other) != first
    greedy = DecodingSettings(max_new_tokens=12, batch_size=2)
    assert generate_answers(model, tokenizer, PROMPTS, greedy) != first  # it did sample


def test_the_name_constraint_runs_inside_sampled_generation(student, monkeypatch):
    model, tokenizer = student
    calls = captured_generate(model, monkeypatch)
    settings = DecodingSettings(
        generation={"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 10},
        max_new_tokens=6,
        known_names_only=True,
    )
    generate_answers(model, tokenizer, PROMPTS[:2], settings, labels=["Alpha", "Beta"])
    config, processors = calls[0]["generation_config"], calls[0]["logits_processor"]
    assert config.do_sample and config.top_k == 10
    assert [type(p) for p in processors] == [NoRepeatedNames] and processors[0].known_names_only
