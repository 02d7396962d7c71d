"""Model-supplied text made safe to print: control characters shown escaped, never sent to the terminal.

Names in a model (nodes, tensors, inputs, outputs, metadata) are arbitrary strings chosen by whoever
made the file. Printed as they are, an escape sequence such as ``"\\x1b]0;title\\x07"`` retitles the
terminal, ``"\\x1b[2J"`` clears it and a newline forges an extra line of output. Every place onnxq prints
such a string passes it through :func:`printable` (or :func:`markup_safe` for rich markup), which
renders control characters the way ``repr`` does (``\\x1b``, ``\\n``) and leaves all other text,
non-ASCII letters included, as it is.
"""

from __future__ import annotations

import logging
import re

import rich.markup

__all__ = ["printable", "markup_safe", "PrintableFormatter"]

# C0 and C1 control characters, DEL, and the Unicode bidirectional overrides/isolates and line/paragraph
# separators (they reorder or break what a terminal shows)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def printable(text: object) -> str:
    """``str(text)`` with every control character written as its escape (``\\x1b``, ``\\n``, ``\\u202e``)."""
    return _UNSAFE.sub(_escaped, str(text))


def markup_safe(text: object) -> str:
    """:func:`printable` text, also escaped for rich markup (a name like ``"[bold]"`` stays literal)."""
    return rich.markup.escape(printable(text))


class PrintableFormatter(logging.Formatter):
    """A log formatter whose message part goes through :func:`printable` (log lines quote model names too);
    a traceback (``--debug``) keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))
