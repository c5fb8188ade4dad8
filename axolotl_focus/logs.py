"""The package's log output: INFO lines of the ``axolotl_focus`` loggers (pruning summary, teacher
placement, what a run does) on stderr, in axolotl's format.

axolotl configures only its own loggers, so the plugin and the CLI install this handler. It writes
to the *current* ``sys.stderr`` at each record (not the stream of the moment it was installed),
so a redirected or captured stderr keeps working.

:func:`quiet_third_party` silences, at their source and before those packages are imported, the
lines other packages print on every command that say nothing about the user's input (the CLI calls
it first; ``--debug`` skips it and shows everything): :data:`QUIET_LOGGERS` at ERROR level and
:data:`QUIET_WARNINGS` filtered.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# loggers whose WARNING lines are noise on a CPU machine / an ordinary install
QUIET_LOGGERS = (
    "torchao",  # "Failed to load .../torchao/_C_mxfp8...so" (its CUDA kernels)
    "torch.utils._pytree",  # "<enum ...> is an Enum subclass ... register_constant() ... deprecated" (torchao)
    "bitsandbytes",  # "Failed to load CPU gemm_4bit_forward from kernels-community ..." (a CPU machine)
)
# warning messages (regular expressions) with the same character
QUIET_WARNINGS = (
    r"You are importing from 'trl\.experimental'",  # axolotl imports TRL's experimental API itself
    r"Skipping publisher trust check",  # bitsandbytes' kernels lookup under HF_HUB_OFFLINE
)


def quiet_third_party(show: bool = False) -> None:
    """Silence the third-party lines of :data:`QUIET_LOGGERS` / :data:`QUIET_WARNINGS` (see the
    module docstring); ``show`` (``--debug``): leave everything as it is."""
    if show:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


class _CurrentStderr(logging.StreamHandler):
    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; stderr is read at emit
        pass


def show_package_logs():
    """Show the package's INFO logs on stderr unless a handler is installed already; returns the
    undo (a no-op when nothing was installed)."""
    logger = logging.getLogger("axolotl_focus")
    if logger.handlers:
        return lambda: None
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(FORMAT))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return undo
