"""The `mint` command (pyproject `[project.scripts]`).

    mint [train] [OVERRIDES]      what `python -m mint.run [OVERRIDES]` runs (Hydra: -m, --cfg job, -sc ...)
    mint ask RUN_DIR [INPUT]      the run's student answers a note (text) or an image file
    mint export RUN_DIR OUT       the run's LoRA merged into its base, a plain HF folder with a model card
    mint runs [DIR]               results.json of every run under DIR (outputs/) in one table

`mint --help` is MINT's short help (config groups and their choices, the usual keys);
`mint --hydra-help` is Hydra's. Shell completion is Hydra's, through this command:
`eval "$(mint -sc install=bash)"`. Imports are lazy: `mint --help` starts in about a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SUBCOMMANDS = ("ask", "export", "runs")
# Groups shown by `mint --help`, in this order (the *_task groups and hydra's own are internal).
GROUPS = (
    "task",
    "optim",
    "teacher",
    "student",
    "quant",
    "generation",
    "trainer",
    "logger",
    "debug",
    "experiment",
    "source",
    "hparams_search",
    "hydra/launcher",
    "callbacks",
    "paths",
)
KEYS = (
    ("seed=42", "teacher and student seed (the data's own seed is task.source.seed)"),
    ("stage=all", "stop after teacher | prefs | student"),
    ("resume=true", "continue the newest matching run from its last checkpoint"),
    ("trainer.max_steps=600", "student training steps"),
    ("student.learning_rate=...", "LoRA learning rate"),
    ("optim.beta=0.1", "ORPO lambda / DPO beta"),
    ("task.max_samples=null", "cap the preference pairs (task=custom|example)"),
    ("task.eval.max_samples=null", "cap the test cases answered"),
    (
        "generation.repetition_penalty=null",
        "any transformers.GenerationConfig field (+generation.KEY=... if unlisted)",
    ),
    ("objective=val/rewards/accuracies", "the metric a sweep optimises"),
    ("paths.cache_dir=outputs/cache", "the stage cache (teachers, preference sets, built students)"),
    ("hydra.run.dir=outputs/runs/NAME", "a fixed run folder"),
)


def compose_config(overrides: list[str], *, return_hydra_config: bool = False):
    """The config `python -m mint.run <overrides>` composes, for scripts outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mint.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    GlobalHydra.instance().clear()
    return cfg


def group_choices() -> dict[str, list[str]]:
    """Each config group's choices as the config tree has them, the typed schemas left out."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mint.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        choices = {
            group: [
                name
                for name in loader.get_group_options(group)
                if not name.endswith("_schema") and not name.startswith("task_")
            ]
            for group in GROUPS
        }
    GlobalHydra.instance().clear()
    return choices


def short_help() -> str:
    lines = [
        "usage: mint [train] [-m] [KEY=VALUE | GROUP=CHOICE ...]   train (what `python -m mint.run` runs)",
        "       mint ask RUN_DIR [NOTE | FILE | -]                   ask a trained run's student",
        "       mint export RUN_DIR OUT [--force]                    merge the LoRA, save a plain HF model",
        "       mint runs [DIR] [--csv FILE]                         all runs under DIR (outputs/) in one table",
        "",
        "MINT: a multimodal teacher's rankings become preference pairs; a LoRA student learns them.",
        "With no overrides: task=tissue optim=orpo (the main job, `make run`). `mint ask -h` etc. for each command.",
        "",
        "config groups (GROUP=CHOICE; teacher and student default to the task's own):",
    ]
    for group, names in group_choices().items():
        lines.append(f"  {group:<15} {', '.join(names)}")
    lines += ["", "usual keys (KEY=VALUE; defaults shown):"]
    width = max(len(k) for k, _ in KEYS)
    lines += [f"  {key:<{width}}  {what}" for key, what in KEYS]
    lines += [
        "",
        "  mint --cfg job          print the composed config (every key)",
        "  mint -m optim=sft,orpo  a sweep (multirun)",
        "  mint --hydra-help       Hydra's own options",
        '  eval "$(mint -sc install=bash)"   tab completion of groups and keys in bash',
    ]
    return "\n".join(lines)


def train(args: list[str]) -> None:
    """Hydra's main from mint/run.py with `args` as its command line (the program name kept, so
    that Hydra's shell completion names `mint`)."""
    completion = args[:1] == ["-sc"]
    if "COMP_LINE" in os.environ and completion:
        # Completion queries see the whole typed line: drop the subcommand word before Hydra parses it.
        words = os.environ["COMP_LINE"].split(" ")
        if len(words) > 1 and words[1] == "train":
            os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
    if not any(a in ("-cp", "--config-path") or a.startswith("--config-path=") for a in args):
        # Imported (not run as __main__), mint.run's config_path="../conf" would be read as a Python
        # package; the folder itself is what `python -m mint.run` reads.
        args = ["--config-path", str(CONF_DIR), *args]
    from mint.extras import check_plugins

    try:
        check_plugins(args)  # before Hydra composes: it would only say the sweeper/launcher is not found
    except ImportError as err:
        print(f"mint: error: {err}", file=sys.stderr)
        sys.exit(2)  # a missing package: the command's set-up must change (mint/errors.py)
    sys.argv = [sys.argv[0], *args]
    if completion:
        # Shell completion reads the config tree only: a Hydra main without mint.run's imports
        # (torch, Lightning) answers each tab press in about a second.
        import hydra

        from mint.config import register_configs

        register_configs()
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(lambda cfg: None)()
        return
    from mint.run import main as hydra_main

    hydra_main()


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "ask":
        p = argparse.ArgumentParser(
            prog="mint ask",
            description="The trained student of RUN_DIR answers one case, as the run's evaluation asks it: "
            "the raw answer, the names matched to the label set, and every label ranked by likelihood.",
        )
        p.add_argument("run_dir", help="a run folder with student/adapter (outputs/runs/...)")
        p.add_argument(
            "input",
            nargs="?",
            help="text student: the note, a file holding it, or - / nothing for stdin; image student: an image file",
        )
        p.add_argument("--top", type=int, default=10, help="labels shown in the ranking (0: all; default 10)")
    elif command == "export":
        p = argparse.ArgumentParser(
            prog="mint export",
            description="Merge the run's LoRA into its base and save a plain Hugging Face model folder "
            "(safetensors, tokenizer or processor, generation config, model card).",
        )
        p.add_argument("run_dir", help="a run folder with student/adapter")
        p.add_argument("out", help="the folder to write (must not exist unless --force)")
        p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    else:
        p = argparse.ArgumentParser(
            prog="mint runs",
            description="Every results.json under DIR (runs and multiruns) in one table, with the overrides "
            "that tell the runs apart.",
        )
        p.add_argument("dir", nargs="?", default="outputs", help="where to look (default: outputs)")
        p.add_argument("--csv", metavar="FILE", help="also write the table, every metric, as CSV to FILE")
        p.add_argument(
            "--metrics", help="comma-separated metric keys for the printed table (default: the headline ones)"
        )
    return p


def run_command(command: str, args: list[str]) -> None:
    options = _parser(command).parse_args(args)
    import logging

    # MINT's warnings (e.g. export de-quantizing a base) on the terminal; the libraries' only when errors.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("mint").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one answer: progress bars are noise here
    try:
        if command == "ask":
            from mint.commands.ask import ask, render

            run, answer = ask(options.run_dir, options.input)
            print(render(run, answer, options.top))
        elif command == "export":
            from mint.commands.export import export

            out = export(options.run_dir, options.out, replace=options.force)
            print(f"exported to {out}")
        else:
            from mint.commands.runs import runs_table

            print(runs_table(options.dir, csv_path=options.csv, metrics=options.metrics))
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from mint.errors import exit_status

        print(f"mint: error: {str(err) or type(err).__name__}", file=sys.stderr)
        sys.exit(exit_status(err))  # 2 for bad input, 1 for a failure of the work (mint/errors.py)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"], ["help"]):
        print(short_help())
        return
    if args[:1] and args[0] in SUBCOMMANDS:
        run_command(args[0], args[1:])
        return
    if args[:1] == ["train"]:
        args = args[1:]
    train(args)


if __name__ == "__main__":
    main()
