"""Run results: results.json (one flat object of final metrics) and results.md; secret scrubbing.

Configs reach disk and trackers in three places: Hydra's `.hydra/*.yaml`, the loggers'
hyperparameters (CSV `hparams.yaml`, the W&B run config) and dataset cards. A value
read from the environment with `${oc.env:WANDB_API_KEY}` is resolved in the last two,
and a key typed on the command line lands in all of them. `scrub` and `scrub_file`
replace secrets with `***` before they are written.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mint.files import write_atomic

REDACTED = "***"
# Environment variables whose value is a secret: a name part (split at "_") is one of these.
SECRET_ENV_PARTS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS", "PAT"}
# Config keys whose string value is a secret whatever it is (compared without "_", "-", case).
SECRET_CONFIG_KEYS = {
    "apikey",
    "wandbapikey",
    "token",
    "hftoken",
    "accesstoken",
    "authtoken",
    "secret",
    "secretkey",
    "password",
    "passwd",
    "privatekey",
    "accesskey",
}
MIN_SECRET_LENGTH = 8  # shorter env values ("true", "1") would redact harmless text


def _plain(value: Any) -> float | int | str | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def write_metrics(path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    flat = {k: _plain(v) for k, v in sorted(metrics.items())}
    write_atomic(path, json.dumps(flat, indent=2) + "\n")
    return flat


def markdown_table(metrics: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in sorted(metrics.items()):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {shown} |")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, metrics: dict[str, Any], title: str) -> dict[str, Any]:
    flat = write_metrics(run_dir / "results.json", metrics)
    write_atomic(run_dir / "results.md", f"# {title}\n\n{markdown_table(flat)}")
    return flat


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of environment variables named like secrets (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_...)."""
    environ = os.environ if environ is None else environ
    return {
        value
        for name, value in environ.items()
        if len(value) >= MIN_SECRET_LENGTH and SECRET_ENV_PARTS & set(name.upper().split("_"))
    }


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(secret, REDACTED)
    return text


def _is_secret_key(key: Any) -> bool:
    return re.sub(r"[_\-\s]", "", str(key)).lower() in SECRET_CONFIG_KEYS


def scrub(config: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of `config` (plain dicts/lists/scalars) with secrets replaced by `***`.

    Redacted: every string value of a key named like a secret (api_key, token, password, ...),
    and every occurrence of a secret environment value (`secret_values`) in any string.
    """
    secrets = secret_values() if secrets is None else set(secrets)
    if isinstance(config, Mapping):
        return {
            k: (REDACTED if _is_secret_key(k) and isinstance(v, str) and v else scrub(v, secrets))
            for k, v in config.items()
        }
    if isinstance(config, list | tuple):
        return type(config)(scrub(v, secrets) for v in config)
    if isinstance(config, str):
        return scrub_text(config, secrets)
    return config


# `key=value` as typed on a command line (`+logger.wandb.api_key=...`; the match starts after the
# last dot) and `key: value` as Hydra writes a config's scalar into .hydra/*.yaml.
_OVERRIDE = re.compile(r"(?P<key>[A-Za-z0-9_\-]+)=(?P<value>[^\s,'\"\]]+)")
_YAML_SCALAR = re.compile(r"^(?P<head>\s*(?:- )?(?P<key>[A-Za-z0-9_\-]+):) (?P<value>\S.*)$", re.MULTILINE)


def scrub_secret_keys(text: str) -> str:
    """`text` with the value of every key named like a secret redacted, in override and YAML form."""
    text = _OVERRIDE.sub(lambda m: f"{m['key']}={REDACTED}" if _is_secret_key(m["key"]) else m[0], text)
    return _YAML_SCALAR.sub(lambda m: f"{m['head']} '{REDACTED}'" if _is_secret_key(m["key"]) else m[0], text)


def scrub_file(path: Path, secrets: Iterable[str] | None = None) -> bool:
    """Rewrite a text file (atomically) with secret environment values and the values of keys named
    like secrets redacted; True if it changed."""
    secrets = secret_values() if secrets is None else set(secrets)
    text = path.read_text()
    clean = scrub_secret_keys(scrub_text(text, secrets))
    if clean == text:
        return False
    write_atomic(path, clean)
    return True


def scrub_job_start(run_dir: Path) -> None:
    """At the start of a Hydra job: redact secret environment values and secret keys' values
    (`+logger.wandb.api_key=...` typed on the command line) from what Hydra wrote (`.hydra/*.yaml`)
    and from `sys.argv`, which W&B records with the run. The job itself has read them already."""
    secrets = secret_values()
    for path in (run_dir / ".hydra").glob("*.yaml"):
        scrub_file(path, secrets)
    sys.argv[:] = [scrub_secret_keys(scrub_text(arg, secrets)) for arg in sys.argv]


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """What the end of a run prints: the task metrics without CI bounds and timings (all are in results.md)."""
    keys = [k for k in results if k.startswith(("test/", "teacher/test/", "val/")) and "_ci_" not in k]
    val_keys = ("val/loss", "val/rewards/accuracies", "val/top1", "val/topk", "val/format_valid")
    keys = [k for k in keys if not k.startswith("val/") or k in val_keys]
    return {k: results[k] for k in keys} or results
