"""Hostile or careless specs (issue 12): each is one short SpecError naming the problem (exit 2 on the command
line), returned within seconds and without gigabytes of memory; nothing echoes a huge value whole."""

from __future__ import annotations

import copy
import time
import tracemalloc

import pytest
import yaml
from test_spec import VALID, write

from orchestrator.cli import EXIT_INVALID, main
from orchestrator.errors import SpecError, brief
from orchestrator.plan import make_plan
from orchestrator.spec import load_spec, read_spec_file, spec_from_dict, spec_to_dict
from orchestrator.typed_yaml import MAX_SPEC_BYTES, MAX_YAML_VALUES

SHORT = 4096  # "a few KB": the most any of these messages may say


def refused(path: str, overrides: list[str] | None = None, *, seconds: float = 10,
            megabytes: float | None = 200) -> str:
    """The SpecError message of load_spec, after checking that it came fast, short and (unless `megabytes` is
    None: tracing slows a pure-Python parse of megabytes tenfold) with little memory."""
    if megabytes is not None:
        tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(SpecError) as info:
            load_spec(path, overrides)
        elapsed, (_, peak) = time.monotonic() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert elapsed < seconds and (megabytes is None or peak < megabytes * 2**20), (elapsed, peak)
    assert len(message) < SHORT, len(message)
    return message


def cli_refuses(args: list[str], capsys) -> str:
    """stderr of the real command, which must exit 2 with a one-line problem and no traceback."""
    code = main(args)
    out, err = capsys.readouterr()
    assert code == EXIT_INVALID and out == "" and "Traceback" not in err, err
    assert len(err) < SHORT
    return err


def billion_laughs(levels: int = 7) -> str:
    """914 bytes that expand to 10**levels values: each level lists the previous one 10 times."""
    names = "abcdefghij"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{n}: &{n} [{', '.join(['*' + p] * 10)}]" for p, n in zip(names, names[1:levels], strict=False)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- reading the file


def test_a_spec_that_is_not_utf8_names_the_byte_offset(tmp_path, capsys):
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: t\nmodel: caf\xe9\n".encode("latin-1"))
    message = refused(str(path))
    assert "not UTF-8 text: byte 0xe9 at offset 18 (line 2)" in message
    assert "not UTF-8" in cli_refuses(["validate", str(path)], capsys)


@pytest.mark.parametrize("text", [
    "a: " + "[" * 1000 + "]" * 1000 + "\n",  # flow style
    "".join(" " * i + f"k{i}:\n" for i in range(1000)),  # block style
    "a: &a [[[[[[[[[[1]]]]]]]]]]\nb: &b [[[[[[[[[[*a]]]]]]]]]]\nc: &c [[[[[[[[[[*b]]]]]]]]]]\n"
    "d: &d [[[[[[[[[[*c]]]]]]]]]]\ne: &e [[[[[[[[[[*d]]]]]]]]]]\nf: [[[[[[[[[[*e]]]]]]]]]]\n",  # deep by aliases
], ids=["flow", "block", "aliases"])
def test_yaml_nested_too_deeply_is_one_line(tmp_path, capsys, text):
    """1,000 levels raised RecursionError; depth reached through aliases counts too (anything that walks
    the data recursively walks the aliases)."""
    path = write(tmp_path, text)
    assert "the YAML nests too deeply" in refused(path)
    assert "nests too deeply" in cli_refuses(["validate", path], capsys)


def test_an_oversized_file_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    size = path.stat().st_size
    message = refused(str(path), seconds=5, megabytes=2 * MAX_SPEC_BYTES / 2**20 + 10)
    assert f"the file is {size:,} bytes; a spec may be at most {MAX_SPEC_BYTES:,} bytes" in message
    assert "at most" in cli_refuses(["validate", str(path)], capsys)


@pytest.mark.parametrize("text,needle", [
    ("name: t\x00\n", "character #x0000 at offset 7"),
    ("name: t\nmodel: m\nx: 2024-13-45\n", "line 3, column 4: cannot read the value '2024-13-45'"),
    ("name: t\nbits: " + "1" * 5000 + "\n", "line 2, column 7: cannot read the value '1111"),
    ("a: &a [1, *a]\n", "the alias *a refers to a node that contains it"),
])
def test_yaml_that_cannot_be_built_is_one_line(tmp_path, capsys, text, needle):
    path = write(tmp_path, text)
    assert needle in refused(path)
    assert needle in cli_refuses(["validate", path], capsys)


def test_set_with_a_value_that_is_not_yaml_names_the_key(tmp_path, capsys):
    path = write(tmp_path, VALID)
    message = refused(path, ["training.lr=[1,"])
    assert "--set training.lr: the value '[1,' is not valid YAML" in message
    assert "--set training.lr: the value '[1,'" in cli_refuses(["validate", path, "--set", "training.lr=[1,"], capsys)
    # an alias bomb in a --set value is refused like one in the file
    laughs = "{" + billion_laughs(7).strip().replace("\n", ", ") + "}"
    assert f"more than {MAX_YAML_VALUES:,} values" in refused(path, [f"sweep.training={laughs}"])


def test_a_huge_list_index_in_set_is_a_problem(tmp_path):
    assert "tasks is a list of 1 item(s)" in refused(write(tmp_path, VALID), ["tasks." + "9" * 5000 + ".x=1"])


# ----------------------------------------------------------------------------------------------- expansion and echo


def test_billion_laughs_is_refused_before_anything_expands_it(tmp_path, capsys):
    """914 bytes, 10**7 values once expanded: the message used to be 72 MB."""
    text = billion_laughs(7)
    assert len(text) < 1000
    path = write(tmp_path, text)
    message = refused(path, seconds=5, megabytes=20)
    assert f"more than {MAX_YAML_VALUES:,} values" in message and "limit" in message
    assert "values" in cli_refuses(["validate", path], capsys)


def test_a_long_flat_list_is_refused_by_the_same_limit(tmp_path):
    data = copy.deepcopy(VALID)
    data["sweep"] = {"lr": [1e-4] * (MAX_YAML_VALUES + 10)}
    assert f"more than {MAX_YAML_VALUES:,} values" in refused(write(tmp_path, yaml.safe_dump(data)), megabytes=None)


def test_a_long_string_value_is_echoed_briefly(tmp_path, capsys):
    data = mutate_copy(quantization={"kind": "x" * 2_000_000, "bits": 4})
    path = write(tmp_path, data)
    message = refused(path, megabytes=None)
    assert "quantization.kind: expected one of" in message and "... (2,000,000 characters)" in message
    assert "(2,000,000 characters)" in cli_refuses(["validate", path], capsys)


def test_every_error_line_and_the_number_of_lines_are_capped():
    """The safety net behind brief(): whatever a problem says, the message stays short."""
    message = str(SpecError(["x: " + "y" * 10**6] + [f"p{i}: bad" for i in range(10_000)], "s.yaml"))
    assert message.startswith("s.yaml: 10001 problem(s)") and "... and 9,976 more problem(s)" in message
    assert len(message) < 20_000 and "(1,000,003 characters)" in message
    assert len(brief("z" * 10**7)) < 200 and len(brief(list(range(10**6)))) < 200 and brief([1, "a"]) == "[1, 'a']"


# ----------------------------------------------------------------------------------------------- sweep.max_trials


@pytest.mark.parametrize("sweep,tasks,trials", [
    ({"lr": [1e-4] * 1000, "rank": list(range(1, 12))}, 1, "11,000 trials"),  # a grid: 1000 x 11 points
    ({"bits": [2, 4], "num_samples": 10**12}, 1, "2,000,000,000,000 trials"),  # would never finish expanding
    ({"mode": "random", "lr_range": [1e-5, 1e-3], "num_samples": 10_001}, 1, "10,001 trials"),
    ({"rank": list(range(1, 101)), "num_samples": 60}, 2, "12,000 trials (6,000 point(s) x 2 task(s))"),
])
def test_a_sweep_over_max_trials_is_refused_before_it_expands(tmp_path, capsys, sweep, tasks, trials):
    data = mutate_copy(sweep=sweep)
    data["tasks"] = [dict(VALID["tasks"][0], name=f"t{i}") for i in range(tasks)]
    path = write(tmp_path, data)
    message = refused(path, seconds=5)
    assert f"sweep.max_trials: the sweep has {trials}" in message and "more than sweep.max_trials 10,000" in message
    # the command line too: validate would plan (expand) the sweep next, so it must stop here, at once
    start = time.monotonic()
    assert "sweep.max_trials" in cli_refuses(["validate", path], capsys)
    assert time.monotonic() - start < 10


def test_max_trials_is_a_setting_with_a_default_that_round_trips(tmp_path):
    path = write(tmp_path, mutate_copy(sweep={"lr": [1e-4, 2e-4, 3e-4], "rank": [4, 8]}))
    assert "the sweep has 6 trials" in refused(path, ["sweep.max_trials=5"])
    spec = load_spec(path, ["sweep.max_trials=6"])
    assert spec.sweep.max_trials == 6 and len(make_plan(spec, str(tmp_path)).trials) == 6
    resolved = spec_to_dict(load_spec(path))
    assert resolved["sweep"]["max_trials"] == 10_000
    problems: list = []
    assert spec_from_dict(copy.deepcopy(resolved), problems) == load_spec(path) and problems == []


# ----------------------------------------------------------------------------------------------- cache.uri


def test_a_cache_uri_naming_a_file_exits_2(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("not a cache")
    path = write(tmp_path, mutate_copy(cache={"uri": str(file)}))
    message = refused(path)
    assert f"cache.uri: expected a directory or s3://bucket/prefix, got '{file}' (it exists and is not a " \
           "directory)" in message
    assert "cache.uri: expected a directory" in cli_refuses(["validate", path], capsys)
    assert load_spec(write(tmp_path, mutate_copy(cache={"uri": str(tmp_path / "new" / "cache")})))  # created later


# ----------------------------------------------------------------------------------------------- run directories


@pytest.mark.parametrize("content,needle", [
    (b"name: t\nmodel: \xff\n", "not UTF-8 text: byte 0xff at offset 15 (line 2)"),
    (b"name: [unclosed\n", "YAML syntax error at line 2"),
    (b"- a list\n", "expected a mapping"),
    (billion_laughs(7).encode(), f"more than {MAX_YAML_VALUES:,} values"),
    (b"#" * (MAX_SPEC_BYTES + 1), f"a spec may be at most {MAX_SPEC_BYTES:,} bytes"),
    (None, "cannot read"),
])
def test_read_spec_file_protects_the_run_directory_reader(tmp_path, content, needle):
    """A run directory's spec.yaml (on shared storage, maybe corrupt) gets the same protections as a spec."""
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        read_spec_file(str(path), "run directory")
    assert needle in str(info.value) and str(info.value).startswith("run directory: 1 problem(s)")
    assert len(str(info.value)) < SHORT


def test_read_spec_file_reads_a_resolved_spec_back(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    resolved = tmp_path / "run-spec.yaml"
    resolved.write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    problems: list = []
    assert spec_from_dict(read_spec_file(str(resolved), str(resolved)), problems) == spec and problems == []


def mutate_copy(**sections) -> dict:
    data = copy.deepcopy(VALID)
    data.update(sections)
    return data
