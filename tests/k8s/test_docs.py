"""The command lines of the Kubernetes deployment and the facts of docs/deploy.md, checked statically.

The RayJob's entrypoint and every `loftune ...` line in docs/deploy.md are parsed by the real CLI parser
(orchestrator.cli.build_parser: a command it lacks fails, there is no other list of flags to fall back on); the
docs say how to install the operator and reach the dashboard, and their sizing figures are the arithmetic.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
from k8s_deployment import DOCS, PAIRS, entrypoint, one, render


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_loftune_command(argv: list[str]) -> None:
    """argv (without 'loftune') is accepted by the real CLI parser, orchestrator.cli.build_parser()."""
    from orchestrator.cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    assert argv[0] in commands, f"unknown loftune command {argv[0]!r}: orchestrator.cli has {sorted(commands)}"
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`loftune {shlex.join(argv)}` is rejected by orchestrator.cli") from exc


@pytest.mark.parametrize("kdir", [s for _, s in PAIRS])
def test_rayjob_entrypoint_is_accepted_by_the_cli(kdir):
    check_loftune_command(entrypoint(one(render(kdir), "RayJob"))[1:])


def test_cli_check_can_fail():
    check_loftune_command(["run", "spec.yaml", "--address", "auto", "--out", "/mnt/loftune/runs/x", "--set", "a=1"])
    with pytest.raises(AssertionError, match="rejected by orchestrator.cli"):
        check_loftune_command(["run", "spec.yaml", "--adress", "auto"])
    with pytest.raises(AssertionError, match="unknown loftune command 'frobnicate'"):
        check_loftune_command(["frobnicate", "spec.yaml"])


def test_cli_check_has_no_fallback_for_a_command_the_cli_lacks(monkeypatch):
    """A command line whose subcommand the CLI lacks fails, however right its flags: the parser is the only
    source of the flags (no copy of DESIGN.md's table to fall back on)."""
    import orchestrator.cli

    def without_run() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="loftune")
        parser.add_subparsers(dest="command").add_parser("quantize")
        return parser

    monkeypatch.setattr(orchestrator.cli, "build_parser", without_run)
    with pytest.raises(AssertionError, match=r"unknown loftune command 'run': orchestrator.cli has \['quantize'\]"):
        check_loftune_command(["run", "spec.yaml", "--address", "auto", "--out", "/mnt/loftune/runs/x"])


def docs_commands() -> list[list[str]]:
    """Every `loftune ...` command line in docs/deploy.md's code blocks."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", DOCS.read_text(), re.S)
    out = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("loftune "):
                out.append(shlex.split(line)[1:])
    return out


def test_docs_loftune_commands_are_accepted_by_the_cli():
    commands = docs_commands()
    assert {c[0] for c in commands} >= {"submit", "status", "logs", "results"}
    for argv in commands:
        check_loftune_command(argv)


def test_docs_say_how_to_reach_the_dashboard():
    text = DOCS.read_text()
    assert "kubectl port-forward svc/loftune-head-svc 8265" in text
    assert "helm install kuberay-operator kuberay/kuberay-operator" in text
    assert "kubectl apply -k k8s/overlays/gpu" in text


def test_sizing_table_figures_are_the_documented_arithmetic():
    """docs/deploy.md's packed-size ratios: bits/16 of fp16 plus one fp16 scale per 64 weights."""
    text = DOCS.read_text()
    for bits, ratio in ((2, 0.141), (4, 0.266)):
        assert abs((bits / 8 + 2 / 64) / 2 - ratio) < 5e-4
        assert f"{ratio:.3f}" in text
