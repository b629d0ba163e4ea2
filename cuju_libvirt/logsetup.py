"""Logging for cujud.

Modules log through ``logging.getLogger(__name__)`` and never touch handlers; only the
daemon calls :func:`setup`. Messages about one VM go through :func:`for_domain`, a child
logger named after the domain, so an operator can follow (or filter) one VM.

Failures are logged by :func:`log_failure`: one summary line at ERROR (or the level
given) that an operator can act on, and the traceback only at DEBUG.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

#: Without timestamps when the stream goes to the journal (it stamps lines itself).
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

_HANDLER_NAME = "cujud"


def setup(level: str | int = "INFO", stream: TextIO | None = None, journal: bool = False) -> logging.Handler:
    """Configure the root logger for the daemon: one stream handler, the given level.

    Calling it again replaces the handler it installed before (e.g. after the
    configuration has been read and set another level); other handlers are left alone.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(JOURNAL_FORMAT if journal else FORMAT))
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else logging.getLevelName(level.upper()))
    return handler


def for_domain(logger: logging.Logger, domain: str) -> logging.Logger:
    """The child logger for one VM, ``<logger>.<domain>``.

    Dots in a domain name would make a chain of loggers, so they become underscores;
    the domain's real name should still appear in the messages that need it.
    """
    return logger.getChild(domain.replace(".", "_") or "_")


def log_failure(
    logger: logging.Logger, what: str, err: BaseException, level: int = logging.ERROR
) -> None:
    """Log ``what`` failed as one line with the error's summary; the traceback at DEBUG only."""
    summary = str(err) or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in summary:
        summary = f"{summary} (cause: {cause})"
    logger.log(level, "%s: %s", what, summary)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("traceback of the failure above (%s)", what, exc_info=err)
