"""orchestrator/calibrate.py: when a calibrated build gathers its Gram matrices layer by layer; the same Grams."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.build import BuildRequest
from orchestrator.calibrate import LAYERWISE_ENV, calibrate_layerwise, gather_build_grams, weights_bytes
from workers.calibration import CalibrationData
from workers.model_source import materialize_tiny
from workers.quant import QuantSpec
from workers.quant_plan import QuantPlan

TEXTS = tuple(f"Question: what is {a} plus {b}? Answer: {a} + {b} = {a + b}" for a, b in [(2, 3), (17, 25), (9, 4)])
TEXTS += ("short", "a somewhat longer calibration text than the others, so the batch is padded")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    return materialize_tiny("tiny-llama", root), materialize_tiny("tiny-bert", root)


def request(source) -> BuildRequest:
    return BuildRequest(source, QuantPlan(QuantSpec("nf", 2, 64)), method="cloq", rank=4, iters=1,
                        calibration=CalibrationData(TEXTS, 32, "test"))


def test_the_environment_switches_to_layer_by_layer_with_the_same_grams(models, monkeypatch, capsys):
    llama, _ = models
    modules = llama.select_targets(["all-linear"])
    monkeypatch.setenv(LAYERWISE_ENV, "0")
    whole = gather_build_grams(request(llama), modules, progress=True)
    assert "5/5" in (err := capsys.readouterr().err) and "text" in err  # the whole model's bar counts texts
    monkeypatch.setenv(LAYERWISE_ENV, "1")
    layerwise = gather_build_grams(request(llama), modules, progress=True)
    assert "2/2" in (err := capsys.readouterr().err) and "layer" in err  # one step per decoder layer
    assert (layerwise.tokens, layerwise.fingerprint) == (whole.tokens, whole.fingerprint) and whole.tokens > 0
    assert set(layerwise.grams) == set(whole.grams) == set(modules)
    for name in modules:  # float32 model, the same computation: float32 rounding only
        torch.testing.assert_close(layerwise.grams[name], whole.grams[name], rtol=1e-5, atol=1e-6)
    q, k = (layerwise.grams[f"model.layers.0.self_attn.{p}_proj"] for p in "qk")
    assert q is k  # shared as the whole model's pass shares it (one object-store entry)


def test_the_switch_without_the_environment_follows_the_models_size(models, monkeypatch):
    llama, bert = models
    monkeypatch.delenv(LAYERWISE_ENV, raising=False)
    assert not calibrate_layerwise(llama)  # a few MB: far under half of any machine's free memory
    monkeypatch.setenv(LAYERWISE_ENV, "1")
    assert calibrate_layerwise(llama)
    with pytest.raises(ValueError, match=f"{LAYERWISE_ENV}=1: model tiny-bert is of type 'bert'"):  # cannot run it
        gather_build_grams(request(bert), bert.select_targets(["all-linear"]), progress=False)
    # the size it compares: every stored tensor's bytes, which is the weight file less its JSON header
    size = sum(os.path.getsize(os.path.join(llama.path, f)) for f in llama.files)
    assert size - 100_000 < weights_bytes(llama) <= size


def test_the_grams_leave_the_driver_layer_by_layer(models, monkeypatch):
    llama, _ = models
    modules = llama.select_targets(["all-linear"])
    monkeypatch.setenv(LAYERWISE_ENV, "0")
    whole = gather_build_grams(request(llama), modules, progress=False)
    monkeypatch.setenv(LAYERWISE_ENV, "1")
    parts: list[dict] = []
    streamed = gather_build_grams(request(llama), modules, progress=False, on_grams=parts.append)
    assert streamed.grams == {} and streamed.tokens == whole.tokens  # the driver keeps counts, not matrices
    assert [sorted({name.split(".")[2] for name in part}) for part in parts] == [["0"], ["1"]]  # one per layer
    for part in parts:
        for name, gram in part.items():
            torch.testing.assert_close(gram, whole.grams[name], rtol=1e-5, atol=1e-6)
    merged = {name: gram for part in parts for name, gram in part.items()}
    assert set(merged) == set(modules)
    assert merged["model.layers.1.mlp.gate_proj"] is merged["model.layers.1.mlp.up_proj"]  # one object-store entry


def test_a_layer_by_layer_build_is_the_whole_model_build(models, monkeypatch, tmp_path):
    from orchestrator.build import ensure_base
    from orchestrator.cache import BaseCache
    from orchestrator.entry import load_entry_tensors

    llama, _ = models
    entries = {}
    for forced in ("0", "1"):
        monkeypatch.setenv(LAYERWISE_ENV, forced)
        cache = BaseCache(str(tmp_path / f"cache-{forced}"))
        entry = ensure_base(request(llama), cache, actors=1, progress=False)
        entries[forced] = load_entry_tensors(cache, entry.name, rank=4)
    assert set(entries["0"]) == set(entries["1"]) and any(name.endswith("lora_A") for name in entries["0"])
    for name, tensor in entries["0"].items():
        assert torch.equal(tensor, entries["1"][name]), name
