"""Logging for every process of the service, set up once by its CLI: text or JSON lines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

_FIELDS = "%(asctime)s %(levelname)s %(name)s"


def configure_logging(level: str, as_json: bool, quiet: Iterable[str] = ()) -> None:
    """Logs to stderr, as text or as JSON lines, for this process and everything it runs.

    The ``quiet`` loggers log warnings and worse only, however verbose ``level`` is.
    """
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(f"{_FIELDS} %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{_FIELDS}: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    floor = max(logging.WARNING, logging.getLevelName(level.upper()))
    for name in quiet:
        logging.getLogger(name).setLevel(floor)
