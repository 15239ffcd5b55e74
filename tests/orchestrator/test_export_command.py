"""`loftune export`: a trial (or a cached base) written so that other tools load it and compute what loftune does.

peft: transformers loads base/ and peft loads adapter/ over it; hf: transformers loads the merged model; both
give the logits of loftune's own model (bf16 storage, so bf16 tolerances). Every export writes loftune.json,
and an export that fails leaves nothing behind and the previous export intact.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
import yaml
from conftest import REPO, fake_trained_checkpoint, loftune, planned_with_bases

from orchestrator.cache import BaseCache
from orchestrator.entry import read_model_inputs
from orchestrator.export_model import ExportError, base_source, choose_trials, trial_source, write_export
from orchestrator.results import TrialRecord
from orchestrator.run_dir import read_run_spec
from workers.export import merged_fp_model, quant_layers
from workers.train_loop import build_model

pytestmark = pytest.mark.usefixtures("ray_session")
ARITHMETIC = os.path.join(REPO, "jobs", "data", "arithmetic.jsonl")
PROMPT = torch.tensor([[5, 17, 301, 42, 7, 99, 1000, 3]])


def causal_trial(root, quantization: dict, model: str = "tiny-llama") -> tuple:
    """A planned prompt -> answer trial on `model`, its base built, and a 'trained' checkpoint of it."""
    spec_path = root / "job.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "exp", "model": model, "cache": {"uri": str(root / "cache")},
        "quantization": {"rank": 4, "iters": 1, **quantization},
        "tasks": [{"name": "arith", "type": "prompt_answer", "train_file": os.path.abspath(ARITHMETIC),
                   "prompt_column": "question", "answer_column": "answer"}],
        "training": {"max_steps": 5}}))
    spec, cache, plan = planned_with_bases(spec_path)
    trial = plan.trials[0]
    adapter = trial.adapter_settings(spec.adapter)
    inputs = read_model_inputs(cache, trial.base, rank=adapter.rank, init=adapter.init)
    assert inputs.adapter_kind == ("qalora" if quantization.get("method") == "qalora" else "lora")
    model = build_model(inputs.model_config, inputs.tensors, adapter, inputs.adapter_kind, None)
    checkpoint = fake_trained_checkpoint(model, root / "checkpoint", {"step": 5})
    record = TrialRecord(trial, "done", 5, [{"step": 5, "eval_exact_match": 0.5, "checkpoint_path": str(checkpoint)}])
    return spec, cache, record, model.eval()


@pytest.fixture(scope="module")
def lora_trial(tmp_path_factory):
    return causal_trial(tmp_path_factory.mktemp("lora"), {"kind": "nf", "bits": 4, "group_size": 64,
                                                          "method": "loftq"})


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=PROMPT).logits.float()


def bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # stored in bf16 (8 bits of mantissa) through ~6 matmuls: compare relative to the logits' scale
    assert (actual - expected).abs().max() <= 0.03 * expected.abs().max(), (actual - expected).abs().max()


def test_peft_export_loads_in_transformers_and_peft_and_gives_loftunes_logits(tmp_path, lora_trial):
    from peft import PeftModel

    spec, cache, record, model = lora_trial
    out = write_export(trial_source(spec, record, cache), str(tmp_path / "export"), "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    bf16_close(logits(peft_model), logits(model))
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "base"))
    assert tokenizer("2 + 3 =")["input_ids"]  # the entry's tokenizer travels with the base
    with open(os.path.join(out, "loftune.json")) as f:
        provenance = json.load(f)
    assert provenance["base"] == record.trial.base and provenance["trial"]["id"] == record.trial.id
    assert provenance["metric"] == "eval_exact_match" and provenance["value"] == 0.5
    assert provenance["format"] == "peft"


def test_hf_export_is_the_merged_model(tmp_path, lora_trial):
    spec, cache, record, model = lora_trial
    out = write_export(trial_source(spec, record, cache), str(tmp_path / "merged"), "hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    bf16_close(logits(merged), logits(model))
    assert not any("lora" in k for k in merged.state_dict())


def test_a_base_exports_with_its_loftq_adapter(tmp_path, lora_trial):
    from peft import PeftModel

    _, cache, record, _ = lora_trial
    source = base_source(cache, record.trial.base)
    out = write_export(source, str(tmp_path / "base-export"), "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    bf16_close(logits(peft_model), logits(source.model))
    with open(os.path.join(out, "loftune.json")) as f:
        assert json.load(f)["base"] == record.trial.base
    with pytest.raises(ExportError, match="--rank"):
        base_source(cache, record.trial.base, rank=7)


def test_an_export_replaces_an_earlier_one_whole_and_refuses_a_foreign_folder(tmp_path, lora_trial):
    spec, cache, record, _ = lora_trial
    source = trial_source(spec, record, cache)
    out = str(tmp_path / "export")
    write_export(source, out, "peft")
    write_export(source, out, "hf")  # an earlier export is replaced, not mixed with the new one
    assert not os.path.exists(os.path.join(out, "adapter")) and os.path.isfile(os.path.join(out, "config.json"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="--out"):
        write_export(source, str(foreign), "hf")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_failing_export_leaves_the_previous_one_and_no_temporary_folder(tmp_path, lora_trial):
    spec, cache, record, _ = lora_trial
    source = trial_source(spec, record, cache)
    out = str(tmp_path / "export")
    write_export(source, out, "hf")
    before = sorted(os.listdir(out))
    source.task_type = "SEQ_CLS"  # gguf refuses a classifier, after the temporary folder exists
    with pytest.raises(ExportError, match="--format gguf"):
        write_export(source, out, "gguf")
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_qalora_cannot_be_a_peft_adapter(tmp_path_factory):
    spec, cache, record, _ = causal_trial(tmp_path_factory.mktemp("qalora"),
                                          {"kind": "int", "bits": 4, "group_size": 32, "method": "qalora"})
    with pytest.raises(ExportError, match="--format hf or --format gguf"):
        write_export(trial_source(spec, record, cache), str(tmp_path_factory.mktemp("x") / "e"), "peft")


@pytest.mark.slow
def test_the_command_exports_the_best_trial_of_a_real_run(sweep, tmp_path):
    from peft import PeftModel

    out = str(tmp_path / "export")
    proc = loftune("export", sweep["run_dir"], "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"exported": [out]}
    with open(os.path.join(out, "loftune.json")) as f:
        provenance = json.load(f)
    best = sweep["summary"]["leaderboard"][0]
    assert provenance["trial"]["id"] == best["trial"] and provenance["base"] == best["base"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "base"))
    model = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    spec = read_run_spec(sweep["run_dir"])
    ours = trial_source(spec, choose_trials(sweep["run_dir"], spec)[0], BaseCache(sweep["cache"])).model
    with torch.no_grad():
        theirs, expected = model(input_ids=PROMPT).logits.float(), ours(input_ids=PROMPT).logits.float()
    assert theirs.shape == (1, 3)  # negative / neutral / positive, with the trained head
    torch.testing.assert_close(theirs, expected, rtol=0, atol=0.03 * expected.abs().max().item() + 1e-3)
    # the run's own best export has the same layout
    best_dir = os.path.join(sweep["run_dir"], "best", "sentiment")
    assert sorted(os.listdir(best_dir)) == ["adapter", "base", "loftune.json"]


@pytest.mark.slow
def test_the_command_names_what_is_wrong(sweep, tmp_path):
    out = str(tmp_path / "e")
    cases = [
        ((sweep["run_dir"], "--trial", "nope", "--out", out), "--trial"),
        ((sweep["run_dir"], "--task", "nope", "--out", out), "--task"),
        (("--out", out), "RUN_DIR or --base"),
        ((sweep["run_dir"], "--base", "k", "--out", out), "RUN_DIR or --base"),
        ((sweep["run_dir"], "--format", "gguf", "--out", out), "--format gguf"),
        (("--base", "no-such-entry", "--cache", sweep["cache"], "--out", out), "no-such-entry"),
    ]
    for args, expected in cases:
        proc = loftune("export", *args)
        assert proc.returncode in (1, 2) and expected in proc.stderr, (args, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)


@pytest.mark.slow
def test_a_qalora_int4_g32_trial_of_smollm2_exports_as_q4_1_bit_for_bit(tmp_path_factory):
    """The GGUF holds the merged model's own codes, scales and merged zero points: transformers reads back exactly
    loftune's dequantized merged weights (no second quantization), and the logits match."""
    pytest.importorskip("gguf")
    spec, cache, record, _ = causal_trial(tmp_path_factory.mktemp("smol"), {"kind": "int", "bits": 4,
                                          "group_size": 32, "method": "qalora"}, model="smollm2-135m")
    source = trial_source(spec, record, cache)
    out = write_export(source, str(tmp_path_factory.mktemp("g") / "gguf"), "gguf")
    layers = quant_layers(source.model)
    assert all(layer.merged for layer in layers.values())  # folded into the zero points by the export
    merged = {name: layer.dequantized_weight(torch.float32) for name, layer in layers.items()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    state = loaded.state_dict()
    assert len(merged) == 210
    for name, weight in merged.items():
        assert torch.equal(state[f"{name}.weight"], weight), name
    ids = torch.tensor([[1, 504, 3458, 314, 216, 28, 335, 216, 29, 47]])
    reference = merged_fp_model(source.model).float().eval()  # the same weights, computed in fp32 as `loaded` is
    with torch.no_grad():
        expected, actual = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    # the unquantized tensors (embeddings, norms) go bf16 -> f16 in the file: a small difference remains
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-2 * expected.abs().max().item())
    with open(os.path.join(out, "loftune.json")) as f:
        assert json.load(f)["format"] == "gguf"
