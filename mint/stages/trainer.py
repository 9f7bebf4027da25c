"""The Lightning side of a run: loggers, callbacks, the Trainer, and the rules of multi-process runs.

Each object is instantiated from its config node (`conf/logger`, `conf/callbacks`,
`conf/trainer`); these helpers hold the wiring only.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mint.files import write_atomic

log = logging.getLogger("mint")


def build_loggers(
    nodes: DictConfig, hparams: dict[str, Any], *, save_dir: Path | None = None, name_suffix: str = ""
) -> list:
    """The loggers of `nodes` (conf/logger), each given the run's (scrubbed) config.

    `save_dir` and `name_suffix` put a sub-run's logs apart from the run's own (the SFT start
    writes to the run's `sft_start/`, and its W&B run is named `<name><suffix>`).
    """
    loggers = []
    for node in nodes.values():
        if node is None or "_target_" not in node:
            continue
        overrides: dict[str, Any] = {}
        if save_dir is not None and "save_dir" in node:
            overrides["save_dir"] = str(save_dir)
        # A CSV logger's name is its subfolder; only a W&B run name says which run it is.
        if name_suffix and str(node._target_).endswith("WandbLogger"):
            overrides["name"] = f"{node.name}{name_suffix}"
        loggers.append(instantiate(node, **overrides))
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


def close_loggers(loggers: list) -> None:
    # A Hydra sweep runs its jobs in one process: an open W&B run would swallow the next job's metrics.
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


@dataclass(frozen=True)
class Table:
    """A table for the loggers that show tables (W&B): plain values, and uint8 [H, W, 3] arrays
    (or None) in the `image_columns`, which become images."""

    key: str
    columns: list[str]
    rows: list[list[Any]]
    image_columns: tuple[str, ...] = ()


def log_final(loggers: list, results: dict[str, Any], media: list[Path | Table], step: int) -> None:
    """The run's final numbers (teacher, preference set, evaluation), plots (image files) and tables,
    to every logger (plots and tables to W&B only: the run folder has them as files)."""
    numbers = {
        k: float(v) for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for logger in loggers:
        logger.log_metrics(numbers, step=step)
        if isinstance(logger, WandbLogger):
            for item in media:
                if isinstance(item, Table):
                    logger.log_table(key=item.key, columns=item.columns, data=wandb_rows(item), step=step)
                else:
                    logger.log_image(key=f"plots/{item.stem}", images=[str(item)], step=step)
        logger.save()


def wandb_rows(table: Table) -> list[list[Any]]:
    import wandb

    images = [table.columns.index(c) for c in table.image_columns]
    return [
        [wandb.Image(v) if i in images and v is not None else v for i, v in enumerate(row)]
        for row in table.rows
    ]


def log_artifact(
    loggers: list, path: Path, *, name: str, kind: str, metadata: dict[str, Any], copy: bool = True
) -> None:
    """`path` (a folder or a file) as a W&B artifact of every W&B logger's run, offline too (the run's
    `.wandb` file records it; `wandb sync` uploads it). `copy=False` for files that never change (stage
    cache entries): W&B then reads them where they are instead of copying them into its staging
    folder (WANDB_DATA_DIR, default ~/.local/share/wandb) until the upload."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or getattr(logger.experiment, "disabled", False):
            continue  # WANDB_MODE=disabled: no checksums of files that go nowhere
        import wandb

        policy = "mutable" if copy else "immutable"
        artifact = wandb.Artifact(artifact_name(name), type=kind, metadata=metadata)
        if path.is_dir():
            artifact.add_dir(str(path), policy=policy)
        else:
            artifact.add_file(str(path), policy=policy)
        logger.experiment.log_artifact(artifact)
        log.info(
            "W&B artifact %s (%s, %d files): %s", artifact.name, kind, len(artifact.manifest.entries), path
        )


def artifact_name(name: str) -> str:
    """W&B artifact names hold letters, digits, '-', '_' and '.' only (128 at most)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:128]


def wandb_run_name(loggers: list) -> str | None:
    """The name of the W&B run among `loggers` (None without one): what its artifacts are named after."""
    return next((str(lg.experiment.name) for lg in loggers if isinstance(lg, WandbLogger)), None)


def build_callbacks(
    nodes: DictConfig, *, progress_bar: bool, training: bool, checkpoint_dir: Path | None = None
) -> list[L.Callback]:
    """The callbacks of `nodes` (conf/callbacks); `checkpoint_dir` moves the checkpoints elsewhere."""
    callbacks = []
    for name, node in nodes.items():
        if node is None:
            continue
        if name == "model_checkpoint" and checkpoint_dir is not None:
            callbacks.append(instantiate(node, dirpath=str(checkpoint_dir)))
        else:
            callbacks.append(instantiate(node))
    # Lightning refuses a progress-bar callback when the bar is switched off.
    if not progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not training:  # nothing to checkpoint
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    callbacks += [CheckpointOnSigterm(c) for c in callbacks if isinstance(c, ModelCheckpoint)][:1]
    return callbacks


class LastValidation(L.Callback):
    """The global step of fit's last validation pass (-1: none yet), so the stage can reuse its
    metrics instead of validating the same weights again when it ran after the last step."""

    def __init__(self) -> None:
        self.step = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint: rerun with resume=true to continue."""


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what SLURM sends before it preempts or times out a job) write `last.ckpt` after
    the step in progress and stop the run, so `resume=true` continues from that step.

    Lightning's own SIGTERM handler only records the signal (`trainer.received_sigterm`) and stops
    at the end of the epoch, without a checkpoint; this acts at the next batch.
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.received_sigterm:
            return
        path = (
            Path(self.checkpoint.dirpath)
            / f"{self.checkpoint.CHECKPOINT_NAME_LAST}{self.checkpoint.FILE_EXTENSION}"
        )
        trainer.save_checkpoint(path)
        raise Preempted(
            f"SIGTERM: stopped after step {trainer.global_step}, checkpoint {path}; "
            "rerun the same command with resume=true to continue"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint whole to a temp file in its own folder (fsynced), then renames it
    onto its name (`mint.files.write_atomic`): a kill at any point leaves the previous file or
    the new one, never half of one.

    Lightning's own writer puts the temp file in the system temp folder and moves it: where that
    is another file system (a node-local /tmp, checkpoints on shared storage) the move is a copy
    into the checkpoint itself. Remote paths keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(Path(path), buffer.getvalue())


def build_trainer(node: DictConfig, *, loggers: list, callbacks: list, root_dir: Path) -> L.Trainer:
    trainer: L.Trainer = instantiate(
        node, logger=loggers or False, callbacks=callbacks, default_root_dir=str(root_dir)
    )
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the config chose
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    refuse_lightning_launch_in_a_sweep(trainer)
    return trainer


def is_global_zero() -> bool:
    """False in the extra processes of a multi-process run: Lightning's DDP launcher re-runs this
    command with LOCAL_RANK set (torchrun and SLURM set RANK / SLURM_PROCID). Only rank 0 writes
    the run's files."""
    return rank_zero_only.rank == 0


def in_a_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (`-m`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def refuse_lightning_launch_in_a_sweep(trainer: L.Trainer) -> None:
    """Lightning's DDP launcher starts the extra processes by re-running this command: inside a
    local multirun (-m) each of them would re-run the whole sweep. SLURM (hydra/launcher=slurm)
    or torchrun start one process per device themselves, which is fine."""
    if trainer.world_size <= 1 or trainer.strategy.cluster_environment.creates_processes_externally:
        return
    if in_a_multirun():
        raise ValueError(
            f"trainer.devices={trainer.num_devices} inside a local multirun (-m): Lightning would start "
            "the extra processes by re-running the whole sweep. Run the jobs one by one without -m, "
            "or launch them with hydra/launcher=slurm (SLURM starts one process per device)"
        )


def gathered_state_dict(trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
    """Under FSDP each process holds a shard of every weight: gather the full state dict (on rank 0,
    keys as in the PEFT model). Every process must call this. None for other strategies."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    full = trainer.strategy.lightning_module_state_dict()  # keys "model.<peft key>"
    return {k.removeprefix("model."): v for k, v in full.items()}
