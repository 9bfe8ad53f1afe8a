"""The one exception type users see, and the exit codes the CLI maps it to."""
from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a bug in the tool, reported with a traceback in the log
EXIT_INPUT = 2  # bad usage or bad input: fix the command or the file
EXIT_RUNTIME = 3  # a stage failed at run time (disk full, NaN loss, export mismatch, out of memory)
EXIT_GATE_BUG = 4  # compress gate only: an unexpected exception in the gate (its 1 means "regression", so a bug must not use it)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; the run can be resumed

_KINDS = {"input": EXIT_INPUT, "runtime": EXIT_RUNTIME, "interrupted": EXIT_INTERRUPTED}


class CompressError(Exception):
    """An error the user can cause or act on; its message says what is wrong and what to do."""

    def __init__(self, message: str, *, hint: str | None = None, kind: str = "input"):
        if kind not in _KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.kind = kind

    @property
    def exit_code(self) -> int:
        return _KINDS[self.kind]

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0))}


def printable(text) -> str:
    """Text from a file (a profile, a manifest, a report, a file name) made safe to print on a terminal: control
    characters (ESC sequences that set the title or clear the screen, carriage returns) shown as \\xNN escapes."""
    return str(text).translate(_CONTROL)


def rich_text(text) -> str:
    """printable(text), with Rich's markup escaped: '[/b]' in a description is shown, not parsed (or a MarkupError)."""
    from rich.markup import escape

    return escape(printable(text))


def did_you_mean(word: str, choices) -> str:
    """A ' Did you mean X?' suffix for an unknown name, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
