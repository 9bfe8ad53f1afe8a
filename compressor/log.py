"""The tool's one progress channel: every stage says what it does through the 'compressor' logger (the CLI shows it
on stderr and copies it to the run's compress.log)."""
from __future__ import annotations

import logging

log = logging.getLogger("compressor")


def say(msg: str) -> None:
    log.info(msg)
