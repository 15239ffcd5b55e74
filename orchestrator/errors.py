"""Errors the command line turns into exit code 2 (bad input), kept free of heavy imports so that every
command can catch them without loading torch."""

from __future__ import annotations


class SpecError(ValueError):
    """Every problem found in a job spec, one per line, each naming its dotted path."""

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems, self.source = problems, source
        super().__init__(self.describe(source))

    def describe(self, source: str) -> str:
        """The problems under a heading that names where they came from (a file, 'run directory', ...)."""
        return f"{source}: {len(self.problems)} problem(s)\n  " + "\n  ".join(self.problems)
