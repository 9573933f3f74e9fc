"""What a worker tells people: stdlib ``logging`` to its log file and the console, and a progress bar on a TTY.

``worker_logger`` gives each worker a logger (``nti_lightning.run.<worker>``) with two handlers: its log file
(``logs/<worker>.log``, every line with a timestamp) and stderr (per-image rows and notes unless ``--quiet``;
warnings always). Names that come from inputs are shown through ``data.ids.printable``, so an ANSI escape or a
newline in a file name cannot rewrite the console. The bar (tqdm) is drawn only on rank 0 and only when stderr
is a terminal: a redirected log gets whole lines, no carriage-return updates; console lines are written above
the bar.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from nti_lightning.data.ids import printable


class _ConsoleHandler(logging.Handler):
    """stderr, through the progress bar when one is drawn."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 — logging must never stop the run
            self.handleError(record)


class _Printable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = printable(record.getMessage())
        record.args = ()
        return True


def worker_logger(name: str, log_file: Path | None, quiet: bool) -> logging.Logger:
    """A fresh logger for one worker: ``log_file`` (INFO and up; None: not yet — lines are held in memory until
    ``add_log_file``, so a run stopped by a check before it starts leaves no log behind) and the console (INFO,
    or WARNING with ``quiet``)."""
    logger = logging.getLogger(f"nti_lightning.run.{name}")
    close_logger(logger)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addFilter(_Printable())
    console = _ConsoleHandler(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        add_log_file(logger, log_file)
    else:
        logger.addHandler(logging.handlers.MemoryHandler(100_000, flushLevel=logging.CRITICAL + 1))
    return logger


def add_log_file(logger: logging.Logger, log_file: Path) -> None:
    """Starts the log file (appending), with the lines held in memory so far first."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for h in list(logger.handlers):
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(handler)
            h.flush()
            logger.removeHandler(h)
    logger.addHandler(handler)


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(None)  # never written: the run did not start
            h.buffer.clear()
        h.close()


def progress_bar(logger: logging.Logger, total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal, else None; console lines go above it."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr)
    for h in logger.handlers:
        if isinstance(h, _ConsoleHandler):
            h.bar = bar
    return bar


def close_bar(logger: logging.Logger, bar) -> None:
    if bar is None:
        return
    for h in logger.handlers:
        if isinstance(h, _ConsoleHandler):
            h.bar = None
    bar.close()
