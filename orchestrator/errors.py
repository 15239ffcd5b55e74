"""Errors the command line turns into exit code 2 (bad input), kept free of heavy imports so that every
command can catch them without loading torch. How a message echoes user input (`brief`, `clip`,
`name_problem`) lives in workers/messages.py, shared with the workers' own input checks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from workers.messages import SHOWN_PROBLEMS, brief, clip

__all__ = ["Problem", "SpecError", "brief"]


@dataclass(frozen=True)
class Problem:
    """One problem with a spec: the dotted path of the field it is about (`sweep.bits[2]`, `--set training.lr`;
    empty when it is about the whole file, e.g. a YAML syntax error) and what is wrong there."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """Every problem found in a job spec, one per line, each naming its dotted path.

    `records` holds them as `Problem`s (for callers that sort them by path); `problems` as the lines printed.
    A plain string is a problem whose message names its place itself (a run directory, a cluster)."""

    def __init__(self, problems: Iterable[Problem | str], source: str = "spec"):
        self.records = tuple(p if isinstance(p, Problem) else Problem("", p) for p in problems)
        self.source = source
        super().__init__(self.describe(source))

    @property
    def problems(self) -> list[str]:
        """Each problem as one line, '<path>: <message>'."""
        return [str(record) for record in self.records]

    def describe(self, source: str) -> str:
        """The problems under a heading that names where they came from (a file, 'run directory', ...).

        Bounded whatever the input: each problem is clipped to one line of LINE_CHARS, and at most
        SHOWN_PROBLEMS are listed (the rest counted), so no spec can make a message of megabytes.
        """
        lines = self.problems
        shown = [clip(line) for line in lines[:SHOWN_PROBLEMS]]
        if len(lines) > SHOWN_PROBLEMS:
            shown.append(f"... and {len(lines) - SHOWN_PROBLEMS:,} more problem(s)")
        return f"{clip(str(source))}: {len(lines)} problem(s)\n  " + "\n  ".join(shown)
