"""The package's log output: INFO lines of the ``axolotl_focus`` loggers (pruning summary, teacher
placement, what a run does) on stderr, in axolotl's format.

axolotl configures only its own loggers, so the plugin and the CLI install this handler. It writes
to the *current* ``sys.stderr`` at each record (not the stream of the moment it was installed),
so a redirected or captured stderr keeps working.
"""

from __future__ import annotations

import logging
import sys

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
