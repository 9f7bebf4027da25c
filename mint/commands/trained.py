"""A finished run folder and its trained student, loaded as the run's evaluation had it.

The run's own config (`.hydra/config.yaml`) decides the student kind and the loader's
arguments (`mint.stages.student.student_spec`); the student is loaded by the kind's `load`
with the run's adapter, the one path training and evaluation take. A student the run built
from config (the tiny ones) is read from the folder it was built into, which the adapter
records as its base; that folder is a plain `save_pretrained` folder, read by the same
`from_pretrained` call as any checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mint.config import register_configs
from mint.eval.generate import DecodingSettings
from mint.files import read_json
from mint.stages.evaluate import eval_job, generation_node
from mint.stages.student import student_spec
from mint.student.kinds import StudentKind, StudentSpec, student_kind

ADAPTER = Path("student") / "adapter"


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    cfg: DictConfig  # the run's config, paths resolved against the run's own folder and start folder
    kind: StudentKind
    spec: StudentSpec  # the run's student, with its saved adapter; a built base by its folder

    @property
    def adapter(self) -> Path:
        return self.run_dir / ADAPTER

    @property
    def is_pipeline(self) -> bool:
        """A task with data, labels, an answer format and evaluation settings (not task=custom|example)."""
        return "source" in self.cfg.task

    def command(self) -> str:
        """The command line that made the run (its Hydra overrides; secrets were scrubbed at start)."""
        overrides = self.run_dir / ".hydra" / "overrides.yaml"
        args = OmegaConf.to_container(OmegaConf.load(overrides)) if overrides.is_file() else []
        return " ".join(["python -m mint.run", *(str(a) for a in args)])

    def choices(self) -> dict[str, str]:
        """The config group choices the run was composed from (`teacher: task_tissue`, ...)."""
        path = self.run_dir / ".hydra" / "hydra.yaml"
        if not path.is_file():
            return {}
        return {k: str(v) for k, v in OmegaConf.load(path).hydra.runtime.choices.items()}

    def decoding(self) -> DecodingSettings:
        """How the run's answers are generated: a pipeline task's evaluation settings; for
        task=custom|example (no task.eval) the run's `generation` node alone."""
        if self.is_pipeline:
            return eval_job(self.cfg).decoding
        return DecodingSettings(generation=generation_node(self.cfg), seed=int(self.cfg.seed))

    def results(self) -> dict[str, Any]:
        path = self.run_dir / "results.json"
        return read_json(path) if path.is_file() else {}


def open_run(run_dir: str | Path) -> TrainedRun:
    """The run in `run_dir`; refused with one line when it is not a run folder or has no adapter."""
    run_dir = Path(run_dir).expanduser().resolve()
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a MINT run folder (no .hydra/config.yaml)")
    adapter = run_dir / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no trained adapter ({ADAPTER}/adapter_config.json): runs with optim=none|rag, "
            "runs stopped before the student (stage=teacher|prefs) and unfinished runs have none"
        )
    register_configs()  # the mint.* resolvers the saved config uses
    cfg = OmegaConf.load(config)
    cfg.paths.output_dir = str(run_dir)  # was ${hydra:runtime.output_dir}: no Hydra here
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file() and OmegaConf.is_interpolation(cfg.paths, "root_dir"):
        # ${mint.cwd:} was the folder the run started in: relative paths (the cache) are read from there
        cfg.paths.root_dir = OmegaConf.load(hydra_file).hydra.runtime.cwd
    kind = student_kind(cfg)
    spec = student_spec(cfg.student)
    if spec.name_or_path is None:  # built from config by the run: the folder the adapter was trained on
        base = read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(
                f"the base student this run built ({base}) is gone (the stage cache was cleared?); "
                f"run the training command again to rebuild it: {TrainedRun(run_dir, cfg, kind, spec).command()}"
            )
        spec = dataclasses.replace(spec, name_or_path=str(base), build=None)
    spec = dataclasses.replace(spec, adapter_path=str(adapter))
    return TrainedRun(run_dir, cfg, kind, spec)


def load_trained(run: TrainedRun, spec: StudentSpec | None = None) -> tuple[torch.nn.Module, Any]:
    """`(model, processor)` of the run, in eval mode: the base with the run's adapter, loaded by the
    student kind as training and evaluation load it (`spec` replaces the run's, e.g. without adapter)."""
    spec = spec or run.spec
    model, processor = run.kind.load(
        spec, cache_dir=str(run.cfg.paths.cache_dir), corpus=None, with_adapter=spec.adapter_path is not None
    )
    return model.eval(), processor
