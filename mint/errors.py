"""How a failed run reaches the user: one line on the terminal, the traceback in the run's log.

Exit status 2 for config and input errors (a value out of range, a missing or malformed file,
data too small, a held-out sample in the training data: the command or its inputs must change),
1 for a failure during the work (a non-finite loss, an error inside torch), 143 for a run stopped
by SIGTERM after writing its checkpoint (`resume=true` continues it). `HYDRA_FULL_ERROR=1`
shows the whole traceback on the terminal as Hydra does.
"""

from __future__ import annotations

import logging
import sys

from omegaconf.errors import OmegaConfBaseException

from mint.leakage import LeakageError
from mint.stages.trainer import Preempted

# What MINT raises when the command or its inputs are wrong: ValueError covers ConfigError and the
# data checks; KeyError a name not in a set (an objective, an HPO term); the OSErrors of a path that
# is missing, in the way or unreadable; an uninstalled extra; OmegaConf's errors (a `???` value
# left unset). Not TypeError, IndexError or other OSErrors (a full disk): failures of the work.
INPUT_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ImportError,
    LeakageError,
    OmegaConfBaseException,
)


# A run stopped by SIGTERM after its checkpoint: what a shell reports for a process ended by
# SIGTERM (128 + 15), so schedulers and scripts see that it did not finish.
PREEMPTED = 143


def exit_status(err: BaseException) -> int:
    if isinstance(err, Preempted):
        return PREEMPTED
    # FloatingPointError is an ArithmeticError, not a ValueError: a non-finite loss is a failure of the work.
    return 2 if isinstance(err, INPUT_ERRORS) else 1


def report(err: BaseException) -> int:
    """Write the traceback to the run's log files, print `mint: error: <cause>` and where the
    traceback is; return the exit status."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.LogRecord(
        "mint", logging.ERROR, __file__, 0, "the run failed", None, (type(err), err, err.__traceback__)
    )
    for handler in files:  # not the console handler: the terminal gets one line
        handler.handle(record)
    cause = str(err) or type(err).__name__
    print(f"mint: error: {cause}", file=sys.stderr)
    if files:
        print(
            f"mint: the traceback is in {files[0].baseFilename} (HYDRA_FULL_ERROR=1 prints it here)",
            file=sys.stderr,
        )
    return exit_status(err)
