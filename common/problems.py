"""What goes wrong with one input file: `Problem` (a report line) and `ValidationError` (raised).

The lowest layer of the data modules: discovery, validation, splits, fingerprinting and
preprocessing all report through these, and this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """A problem with one input file; `str()` is the one line `path: message`."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ValidationError(ValueError):
    """Raised for a file that cannot be used; `str()` is the one line `path: message`."""

    def __init__(self, path: Path | str, message: str):
        self.problem = Problem(Path(path), message)
        super().__init__(str(self.problem))


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (at most `limit` characters), or its type's name."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["Problem", "ValidationError", "one_line"]
