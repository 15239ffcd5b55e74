"""Errors the command line turns into exit code 2 (bad input), kept free of heavy imports so that every
command can catch them without loading torch. How a message echoes user input (`brief`, `clip`,
`name_problem`) lives in workers/messages.py, shared with the workers' own input checks."""

from __future__ import annotations

from workers.messages import SHOWN_PROBLEMS, brief, clip

__all__ = ["SpecError", "brief"]


class SpecError(ValueError):
    """Every problem found in a job spec, one per line, each naming its dotted path."""

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems, self.source = problems, source
        super().__init__(self.describe(source))

    def describe(self, source: str) -> str:
        """The problems under a heading that names where they came from (a file, 'run directory', ...).

        Bounded whatever the input: each problem is clipped to one line of LINE_CHARS, and at most
        SHOWN_PROBLEMS are listed (the rest counted), so no spec can make a message of megabytes.
        """
        shown = [clip(str(problem)) for problem in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            shown.append(f"... and {len(self.problems) - SHOWN_PROBLEMS:,} more problem(s)")
        return f"{clip(str(source))}: {len(self.problems)} problem(s)\n  " + "\n  ".join(shown)
