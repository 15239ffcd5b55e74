"""method cloq through the service: the key, the distributed build with Gram matrices, the spec, the plan, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import loftune, write_spec

from orchestrator.build import BuildInputError, BuildRequest, ensure_base
from orchestrator.cache import BaseCache, BaseCacheKey
from orchestrator.entry import error_table, load_entry_tensors
from orchestrator.errors import SpecError
from orchestrator.plan import make_plan
from orchestrator.spec import build_spec
from workers.calibration import CalibrationData, calibration_fingerprint, gather_grams
from workers.cloq import damped_cholesky
from workers.entry_format import qweight_parts
from workers.model_source import materialize_tiny
from workers.quant import QuantizedTensor, QuantSpec, dequantize
from workers.quant_plan import QuantPlan

pytestmark = pytest.mark.usefixtures("ray_session")

TEXTS = tuple(f"Question: what is {a} plus {b}? Answer: {a} + {b} = {a + b} #### {a + b}"
              for a, b in [(2, 3), (17, 25), (9, 40), (33, 8), (12, 12), (50, 7), (6, 19), (41, 2)])
CALIBRATION = CalibrationData(TEXTS, 48, "test")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))


def request(source, method="cloq", calibration=CALIBRATION, iters=1, rank=8) -> BuildRequest:
    return BuildRequest(source, QuantPlan(QuantSpec("nf", 2, 64)), method=method, rank=rank, iters=iters,
                        calibration=calibration)


def test_the_key_holds_the_calibration_data_and_old_keys_stay_as_they_were():
    fields = dict(model="m", fingerprint="f", quant={"bits": 2}, quant_label="nf2-g64", iters=1, rank=8,
                  targets=("all-linear",))
    loftq = BaseCacheKey(method="loftq", **fields)
    assert "calibration" not in loftq.fields()  # the digest of every non-calibrated entry is unchanged
    one = BaseCacheKey(method="cloq", calibration=CALIBRATION.key_fields(), **fields)
    other = BaseCacheKey(method="cloq", calibration=CalibrationData(TEXTS[:4], 48).key_fields(), **fields)
    assert one.fields()["calibration"]["fingerprint"] == calibration_fingerprint(TEXTS, 48)
    assert len({loftq.name, one.name, other.name}) == 3 and "__cloq-t1__" in one.name
    with pytest.raises(ValueError, match="calibration: method 'cloq' needs"):
        BaseCacheKey(method="cloq", **fields)
    with pytest.raises(ValueError, match="calibration: only a calibrated method"):
        BaseCacheKey(method="loftq", calibration=CALIBRATION.key_fields(), **fields)
    with pytest.raises(ValueError, match="calibration.fingerprint"):
        BaseCacheKey(method="cloq", calibration={**CALIBRATION.key_fields(), "fingerprint": "x"}, **fields)


def test_a_build_request_says_what_calibration_it_lacks(tiny_llama):
    with pytest.raises(BuildInputError, match="calibration: method 'cloq' needs calibration data"):
        request(tiny_llama, calibration=None)
    with pytest.raises(BuildInputError, match=r"calibration: the full-precision control \(bits 16\) takes none"):
        BuildRequest(tiny_llama, None, method="lora", iters=0, calibration=CALIBRATION)
    # data that only scores a LoftQ or QLoRA base changes none of its bytes: the same entry
    for method in ("loftq", "qlora"):
        scored, plain = (request(tiny_llama, method=method, calibration=c) for c in (CALIBRATION, None))
        assert scored.key() == plain.key() and "calibration" not in scored.key().fields()


def output_errors(source, cache, name: str, grams: dict) -> dict[str, float]:
    """||(W - Q - BA) R^T|| / ||W R^T|| of every target of an entry, R from its Gram matrix (damping as cloq's)."""
    tensors = load_entry_tensors(cache, name, rank=8)
    out = {}
    for module, gram in grams.items():
        w = source.read(module + ".weight").float()
        q = dequantize(QuantizedTensor.from_state_dict(qweight_parts(tensors, module)))
        approx = q.float() + tensors[module + ".lora_B"].float() @ tensors[module + ".lora_A"].float()
        r, _ = damped_cholesky(gram.float())
        out[module] = (torch.linalg.vector_norm((w - approx) @ r.T) / torch.linalg.vector_norm(w @ r.T)).item()
    return out


def test_cloq_builds_through_the_actors_and_beats_loftq_on_its_inputs(tiny_llama, tmp_path):
    cache = BaseCache(str(tmp_path / "cache"))
    cloq = ensure_base(request(tiny_llama), cache, actors=2, progress=False)
    loftq = ensure_base(request(tiny_llama, method="loftq", calibration=None), cache, actors=2, progress=False)
    record = cloq.manifest["calibration"]
    assert record["fingerprint"] == CALIBRATION.fingerprint and record["samples"] == len(TEXTS)
    assert record["tokens"] > len(TEXTS) and cloq.manifest["method"] == "cloq"
    assert all(0 < m["weight_error"] < 1 for m in cloq.manifest["matrices"].values())
    assert "output_err" in error_table(cloq.manifest) and "output_err" not in error_table(loftq.manifest)
    assert "output_error" not in loftq.manifest["matrices"][sorted(loftq.manifest["matrices"])[0]]

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama.path, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama.path)
    targets = sorted(cloq.manifest["matrices"])
    grams = gather_grams(model, tokenizer, TEXTS, targets, max_length=48).grams
    calibrated, plain = (output_errors(tiny_llama, cache, r.name, grams) for r in (cloq, loftq))
    for module in targets:  # iters 1: the same Q, and the best weighted rank-8 step for it
        assert calibrated[module] <= plain[module] * 1.001, module
    recorded = {m: min(r["errors"]) for m, r in cloq.manifest["matrices"].items()}
    assert all(abs(recorded[m] - calibrated[m]) < 1e-3 for m in targets)  # the manifest says what it is
    assert all(abs(cloq.manifest["matrices"][m]["output_error"] - calibrated[m]) < 1e-3 for m in targets)


def test_calibration_data_scores_a_loftq_and_a_qlora_base_in_both_norms(tiny_llama, tmp_path):
    cache = BaseCache(str(tmp_path / "cache"))
    loftq, qlora = (ensure_base(request(tiny_llama, method=m), cache, actors=2, progress=False)
                    for m in ("loftq", "qlora"))
    assert loftq.manifest["calibration"]["role"].startswith("scores output_error only")
    assert loftq.name == request(tiny_llama, method="loftq", calibration=None).key().name

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama.path, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama.path)
    targets = sorted(loftq.manifest["matrices"])
    grams = gather_grams(model, tokenizer, TEXTS, targets, max_length=48).grams
    expected = output_errors(tiny_llama, cache, loftq.name, grams)
    for module in targets:
        rec, plain = loftq.manifest["matrices"][module], qlora.manifest["matrices"][module]
        assert abs(rec["output_error"] - expected[module]) < 1e-3, module  # the norm cloq minimizes
        assert abs(rec["weight_error"] - min(rec["errors"])) < 1e-4, module  # LoftQ's errors are weight errors
        # QLoRA's base is the plain quantization: both of its errors are that of Q alone
        assert abs(plain["weight_error"] - plain["quant_error"]) < 1e-4 and plain["output_error"] > 0
    assert "output_err" in error_table(loftq.manifest)


def test_a_cloq_build_is_deterministic_and_its_key_follows_the_data(tiny_llama, tmp_path):
    first = ensure_base(request(tiny_llama, iters=2), BaseCache(str(tmp_path / "a")), actors=2, progress=False)
    second = ensure_base(request(tiny_llama, iters=2), BaseCache(str(tmp_path / "b")), actors=1, progress=False)
    hashes = [{p.rsplit("/", 1)[-1]: f["sha256"] for p, f in r.manifest["files"].items()} for r in (first, second)]
    assert first.name == second.name and hashes[0] == hashes[1]
    other = request(tiny_llama, calibration=CalibrationData(TEXTS[::-1], 48), iters=2)
    assert other.key().name != first.name


def spec_with(tmp_path, **quantization) -> dict:
    rows = [{"question": f"what is {i} plus 1?", "answer": f"{i} + 1 = {i + 1} #### {i + 1}"} for i in range(40)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "c", "model": "tiny-llama",
            "quantization": {"kind": "nf", "bits": 2, "group_size": 64, "rank": 4, "iters": 1, **quantization},
            "tasks": [{"name": "qa", "type": "prompt_answer", "train_file": str(data), "prompt_column": "question",
                       "answer_column": "answer", "max_length": 32, "eval_fraction": 0.25}],
            "training": {"max_steps": 4, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": 4},
            "sweep": {"method": ["loftq", "cloq"]}}


def problems_of(data: dict) -> list[str]:
    problems: list = []
    build_spec(data, problems)
    return [f"{p.path}: {p.message}" for p in problems]


def test_the_spec_takes_cloq_and_says_what_it_needs(tmp_path):
    assert problems_of(spec_with(tmp_path)) == []
    assert problems_of(spec_with(tmp_path, method="cloq", calibration={"samples": 16})) == []
    assert any(p.startswith("quantization.iters: 'cloq' alternates") for p in problems_of(spec_with(tmp_path, iters=0)))
    loftq_only = {**spec_with(tmp_path, calibration={"samples": 8}), "sweep": {}}
    assert problems_of(loftq_only) == []  # the data then scores the LoftQ base
    full_precision = {**spec_with(tmp_path, bits=16, calibration={"samples": 8}), "sweep": {}}
    assert any(p.startswith("quantization.calibration: every trial is bits 16") for p in problems_of(full_precision))
    assert any(p.startswith("quantization.calibration.column: goes with calibration.file")
               for p in problems_of(spec_with(tmp_path, calibration={"column": "text"})))
    assert any(p.startswith("quantization.calibration.samples: expected an integer >= 1")
               for p in problems_of(spec_with(tmp_path, calibration={"samples": 0})))
    for damping, expected in ((0, "expected a number > 0 (default 1), got 0"), (-1, "expected a number > 0"),
                              ("high", "expected float, got str 'high'")):
        assert any(p.startswith(f"quantization.calibration.damping: {expected}")
                   for p in problems_of(spec_with(tmp_path, calibration={"damping": damping}))), damping


def test_the_damping_of_the_spec_goes_into_the_key(tmp_path):
    problems: list = []
    plans = [make_plan(build_spec(spec_with(tmp_path, calibration=c), problems), str(tmp_path / "work"))
             for c in ({}, {"damping": 0.3})]
    assert problems == []
    default, damped = ([b for b in plan.builds if b.method == "cloq"][0] for plan in plans)
    assert default.calibration.damping == 1.0 and damped.calibration.damping == 0.3
    assert default.key().fields()["calibration"]["damping"] == 1.0
    assert damped.key().fields()["calibration"]["damping"] == 0.3 and damped.key().name != default.key().name


def test_the_plan_calibrates_on_the_first_tasks_training_rows(tmp_path):
    problems: list = []
    spec = build_spec(spec_with(tmp_path, calibration={"samples": 100}), problems)
    plan = make_plan(spec, str(tmp_path / "work"))
    cloq = [b for b in plan.builds if b.method == "cloq"]
    loftq = [b for b in plan.builds if b.method == "loftq"]
    assert len(cloq) == 1 and len(loftq) == 1
    assert loftq[0].calibration is cloq[0].calibration and not loftq[0].calibrated  # scores it, not in its key
    texts = cloq[0].calibration.texts
    assert len(texts) == 30 and texts[0].startswith("what is ") and " #### " in texts[0]  # 25% held out
    assert {t.method for t in plan.trials} == {"loftq", "cloq"} and any(t.id.endswith("cloq-r4-lr0.0002")
                                                                        or "cloq" in t.id for t in plan.trials)


def test_an_unusable_calibration_file_is_a_spec_error_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    problems: list = []
    spec = build_spec(spec_with(tmp_path, calibration={"file": missing}), problems)
    with pytest.raises(SpecError) as info:
        make_plan(spec, str(tmp_path / "work"))
    assert [p.path for p in info.value.records] == ["quantization.calibration.file"]
    assert missing in info.value.records[0].message


def test_loftune_quantize_builds_a_cloq_base_and_names_a_missing_file(tmp_path):
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"line": t}) + "\n" for t in TEXTS))
    cache = str(tmp_path / "cache")
    common = ("quantize", "--model", "tiny-llama", "--bits", "2", "--method", "cloq", "--rank", "4", "--iters", "1")
    missing = loftune(*common, cache=cache)
    assert missing.returncode == 2 and "--calibration-file: method 'cloq' needs calibration data" in missing.stderr
    wrong = loftune(*common, "--calibration-file", str(data), cache=cache)
    assert wrong.returncode == 2 and "--calibration-column: no column 'text'" in wrong.stderr
    built = loftune(*common, "--calibration-file", str(data), "--calibration-column", "line",
                    "--calibration-samples", "4", "--json", cache=cache)
    assert built.returncode == 0, built.stderr[-2000:]
    result = json.loads(built.stdout)
    manifest = BaseCache(cache).show(result["key"])
    assert "__cloq-t1__" in result["key"] and manifest["calibration"]["samples"] == 4
    assert manifest["key"]["calibration"] == CalibrationData(TEXTS[:4], 512).key_fields()
    bad = loftune(*common, "--calibration-file", str(data), "--calibration-column", "line",
                  "--calibration-damping", "0", cache=cache)
    assert bad.returncode == 2 and "--calibration-damping: expected a number > 0 (default 1), got 0" in bad.stderr
    loftq = [a if a != "cloq" else "loftq" for a in common]
    no_file = loftune(*loftq, "--calibration-samples", "4", cache=cache)
    assert no_file.returncode == 2 and "--calibration-file: the other --calibration-* flags need" in no_file.stderr
    scored = loftune(*loftq, "--calibration-file", str(data), "--calibration-column", "line", "--json", cache=cache)
    assert scored.returncode == 0, scored.stderr[-2000:]
    records = BaseCache(cache).show(json.loads(scored.stdout)["key"])["matrices"].values()
    assert all(0 < r["output_error"] < 1 and 0 < r["weight_error"] < 1 for r in records)


@pytest.mark.slow
def test_a_run_sweeps_loftq_beside_cloq(tmp_path):
    spec = write_spec(tmp_path / "job.yaml", spec_with(tmp_path), str(tmp_path / "cache"))
    proc = loftune("run", spec, "--out", str(tmp_path / "run"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["leaderboard"]
    assert sorted(r["method"] for r in rows) == ["cloq", "loftq"] and all(r["status"] == "done" for r in rows)
    cache = BaseCache(str(tmp_path / "cache"))
    for row in rows:  # both bases are scored on the same calibration inputs, in the same norm
        matrices = cache.show(row["base"])["matrices"].values()
        assert all(0 < m["output_error"] < 1 for m in matrices), row["method"]


def test_qalora_cloq_builds_pooled_factors_that_train_as_qalora(tiny_llama, tmp_path):
    from orchestrator.entry import read_model_inputs

    cache = BaseCache(str(tmp_path / "cache"))
    plan = QuantPlan(QuantSpec("int", 2, 32))
    pooled = ensure_base(BuildRequest(tiny_llama, plan, method="qalora-cloq", rank=2, iters=1,
                                      calibration=CALIBRATION), cache, progress=False)
    inputs = read_model_inputs(cache, pooled.name, rank=2)
    assert inputs.adapter_kind == "qalora" and "__qalora-cloq-t1__" in pooled.name
    module = "model.layers.0.mlp.down_proj"
    in_features = tiny_llama.tensors[module + ".weight"].shape[1]
    assert inputs.tensors[module + ".lora_A"].shape == (2, in_features // 32)
    records = pooled.manifest["matrices"].values()
    assert all(r["errors"][0] < r["quant_error"] and 0 < r["weight_error"] for r in records)
    with pytest.raises(BuildInputError, match="'qalora-cloq' needs kind 'int'"):
        ensure_base(BuildRequest(tiny_llama, QuantPlan(QuantSpec("nf", 2, 32)), method="qalora-cloq", rank=2,
                                 iters=1, calibration=CALIBRATION), cache, progress=False)
