"""A terminal that shows loftune's own progress and tables: library banners, bars and known warnings off.

`loftune run` used to print Ray's start banner and Tune's box table, a tqdm bar per file that transformers or
datasets wrote, DeepSpeed's accelerator notice and a handful of warnings repeated by every process. Each is
turned off at its source where the library offers a switch (environment variables, logger levels, warning
filters, all set with `setdefault` so that a user can turn one back on), and the few that only exist as printed
lines are dropped by `NoiseFilter` on the way to the terminal. Errors are never filtered: only the exact
messages listed in NOISE are.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings

QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's old reporter, which verbose=0 silences (the new one prints a box table)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Writing model shards" and hub bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating train split"
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of every Ray worker that tokenizes
}

# lines that libraries print (not log) and that say nothing a loftune user can act on
NOISE = [re.compile(p) for p in (
    r"WARNING: \d+ PYTHON worker processes have been started",  # raylet: Tune and Train start many actors
    r"Started a local Ray instance",
    r"Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes, imported by peft
    r"Setting accelerator to CPU",  # DeepSpeed, when it finds no GPU
)]

QUIET_LOGGERS = {"ray": logging.WARNING, "ray.tune": logging.WARNING, "ray.train": logging.WARNING,
                 "bitsandbytes": logging.ERROR, "DeepSpeed": logging.WARNING, "datasets": logging.ERROR}

QUIET_WARNINGS = (
    (FutureWarning, r".*is_gradient_checkpointing.*"),  # peft calling a transformers name deprecated in v6
    (UserWarning, r".*TypedStorage is deprecated.*"),
    (DeprecationWarning, r".*"),
)


def quiet_libraries(environ: dict | None = None) -> None:
    """Turn library noise off for this process and the Ray workers it starts (they inherit the environment)."""
    environ = os.environ if environ is None else environ
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value)
    if "DS_ACCELERATOR" not in environ and not _has_cuda():
        environ["DS_ACCELERATOR"] = "cpu"  # said, DeepSpeed does not probe for a GPU and warn that it found none
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def is_noise(text: str) -> bool:
    """Whether a printed chunk is one of the known, harmless library lines."""
    return any(p.search(text) for p in NOISE)


class NoiseFilter(io.TextIOBase):
    """A text stream that passes everything to `stream` except chunks that `is_noise` recognizes.

    Libraries print a message with one write call and its newline with the next, so the newline after a
    dropped chunk is dropped too.
    """

    def __init__(self, stream):
        self.stream = stream
        self._dropped = False

    def write(self, text: str) -> int:
        if is_noise(text):
            self._dropped = not text.endswith("\n")
            return len(text)
        if self._dropped and text == "\n":
            self._dropped = False
            return len(text)
        self._dropped = False
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")
