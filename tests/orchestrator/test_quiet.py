"""The terminal shows loftune's output: library noise is switched off at its source or filtered as known lines,
and errors pass untouched."""

from __future__ import annotations

import io
import warnings

from orchestrator.quiet import QUIET_ENV, NoiseFilter, is_noise, quiet_libraries

RAYLET_LINE = ("(raylet) WARNING: 8 PYTHON worker processes have been started on node: af61 with address: "
               "192.0.2.2, which is 4x the maximum of 2 (num CPUs)")


def test_the_filter_drops_known_lines_with_their_newline_and_passes_everything_else():
    out = io.StringIO()
    terminal = NoiseFilter(out)
    print(RAYLET_LINE, file=terminal)
    print("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'", file=terminal)
    print("trial arith-nf2 failed: RuntimeError: CUDA out of memory", file=terminal)
    terminal.write("arith steps:  50%|#####     | 2/4\r")
    print("", file=terminal)  # a blank line of the program's own is kept
    assert out.getvalue() == ("trial arith-nf2 failed: RuntimeError: CUDA out of memory\n"
                              "arith steps:  50%|#####     | 2/4\r\n")


def test_errors_are_not_noise():
    for line in ("(raylet) A worker died or was killed while executing a task", "ERROR: disk full",
                 "Traceback (most recent call last):", "RuntimeError: Setting accelerator failed"):
        assert not is_noise(line), line


def test_switches_are_defaults_a_user_can_override():
    environ = {"HF_HUB_DISABLE_PROGRESS_BARS": "0", "DS_ACCELERATOR": "cuda"}
    with warnings.catch_warnings():
        quiet_libraries(environ)
    assert environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0" and environ["DS_ACCELERATOR"] == "cuda"
    assert all(environ[k] == v for k, v in QUIET_ENV.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS")


def test_a_real_run_prints_no_library_banner_bar_or_known_warning(sweep):
    for noise in ("Configuration for experiment", "Started a local Ray instance", "Writing model shards",
                  "Generating train split", "PYTHON worker processes", "View detailed results here",
                  "tensorboard --logdir", "Setting accelerator to CPU", "FutureWarning", "DeprecationWarning"):
        assert noise not in sweep["stderr"], noise
    assert "bases built" in sweep["stderr"] or "trial" in sweep["stderr"]  # loftune's own output is still there
