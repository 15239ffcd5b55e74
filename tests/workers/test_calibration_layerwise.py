"""workers/calibration_layerwise.py: the whole-model pass's Gram matrices, one decoder layer in memory at a time."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import transformers

from workers.calibration import gather_grams
from workers.calibration_layerwise import gather_grams_layerwise, meta_model
from workers.model_source import ModelSource, materialize_tiny, open_model

# lengths from 2 to ~20 tokens: batches of 4 are padded, so a mask that let padding in would show
TEXTS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog near the river bank",
         "two plus two is four", "numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "hello", "calibration is a fixed sample"]


def whole_model_grams(source: ModelSource, tokenizer, modules: list[str], **options):
    """The reference: gather_grams on the whole model, loaded as the driver's whole-model path loads it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype="auto").eval()
    return gather_grams(model, tokenizer, TEXTS, modules, **options)


def assert_same_grams(whole, layerwise, rtol: float, scale_atol: float) -> None:
    """Same modules, tokens, samples and fingerprint; each Gram close (atol relative to its largest entry, as the
    off-diagonal entries near 0 have no relative precision); the same modules share one tensor object."""
    assert set(layerwise.grams) == set(whole.grams)
    assert (layerwise.tokens, layerwise.samples, layerwise.fingerprint) == (whole.tokens, whole.samples,
                                                                          whole.fingerprint)
    for name, gram in whole.grams.items():
        assert layerwise.grams[name].dtype == torch.float32
        torch.testing.assert_close(layerwise.grams[name], gram, rtol=rtol, atol=scale_atol * gram.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
    names = sorted(whole.grams)
    for a in names:
        for b in names:
            assert (layerwise.grams[a] is layerwise.grams[b]) == (whole.grams[a] is whole.grams[b]), (a, b)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    source = materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))
    return source, transformers.AutoTokenizer.from_pretrained(source.path), source.select_targets(["all-linear"])


def test_tiny_llama_layer_by_layer_gives_the_whole_models_grams(tiny):
    source, tokenizer, modules = tiny
    assert source.config["dtype" if "dtype" in source.config else "torch_dtype"] == "float32"
    whole = whole_model_grams(source, tokenizer, modules, batch_size=4)
    layerwise = gather_grams_layerwise(source, tokenizer, TEXTS, modules, max_length=512, batch_size=4)
    # float32 all through, the same kernels on the same inputs in the same order: equal up to float32 rounding
    # (bit for bit when measured here); 1e-5 leaves room for a reordered reduction, nothing more
    assert_same_grams(whole, layerwise, rtol=1e-5, scale_atol=1e-6)
    attn, mlp = (lambda p: layerwise.grams[f"model.layers.0.self_attn.{p}_proj"],
                 lambda p: layerwise.grams[f"model.layers.0.mlp.{p}_proj"])
    assert attn("q") is attn("k") is attn("v") and attn("o") is not attn("q")
    assert mlp("gate") is mlp("up") and mlp("down") is not mlp("up")
    assert attn("q") is not layerwise.grams["model.layers.1.self_attn.q_proj"]


def test_truncation_and_batching_as_the_whole_model_path(tiny):
    source, tokenizer, modules = tiny
    whole = whole_model_grams(source, tokenizer, modules, max_length=5, batch_size=6)
    layerwise = gather_grams_layerwise(source, tokenizer, TEXTS, modules, max_length=5, batch_size=6)
    assert layerwise.tokens == sum(min(len(tokenizer(t)["input_ids"]), 5) for t in TEXTS)
    assert_same_grams(whole, layerwise, rtol=1e-5, scale_atol=1e-6)


def test_one_decoder_layer_is_materialized_at_a_time(tiny):
    """From inside every target's pre-hook: only that target's own layer has real parameters (the rest, and the
    embedding, are on the meta device); layers after the last target are never materialized."""
    source, tokenizer, _ = tiny
    model = meta_model(source)
    layers = model.model.layers
    modules = [n for n, _ in model.named_modules() if n.startswith("model.layers.0.") and n.endswith("_proj")]
    seen = []

    def count_real(module, _inputs):
        real = [i for i, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]
        own = next(i for i, layer in enumerate(layers) if any(m is module for m in layer.modules()))
        seen.append((own, real, model.model.embed_tokens.weight.device.type))

    names = dict(model.named_modules())
    for name in modules:
        names[name].register_forward_pre_hook(count_real)
    progress = []
    result = gather_grams_layerwise(source, tokenizer, TEXTS, modules, batch_size=4, model=model,
                                    on_layer=lambda done, total: progress.append((done, total)))
    assert len(seen) == len(modules) * 2  # every target, in each of the 2 batches
    assert all(real == [own] and embedding == "meta" for own, real, embedding in seen)
    assert progress == [(1, 1)]  # layer 1 has no target: not run
    assert all(p.device.type == "meta" for p in layers.parameters())  # freed at the end too
    whole = whole_model_grams(source, tokenizer, modules, batch_size=4)
    assert_same_grams(whole, result, rtol=1e-5, scale_atol=1e-6)


def test_every_layer_reports_progress_and_holds_one_layer(tiny):
    source, tokenizer, modules = tiny
    model = meta_model(source)
    layers = model.model.layers
    real_at_each = []

    def after_layer(done, total):
        real_at_each.append((done, total, sum(any(p.device.type != "meta" for p in layer.parameters())
                                              for layer in layers)))

    gather_grams_layerwise(source, tokenizer, TEXTS, modules, model=model, on_layer=after_layer)
    assert real_at_each == [(1, 2, 0), (2, 2, 0)]


def test_an_unsupported_architecture_or_target_is_a_clear_error(tiny, tmp_path):
    source, tokenizer, modules = tiny
    bert = materialize_tiny("tiny-bert", str(tmp_path))
    with pytest.raises(ValueError, match=r"type 'bert'.*whole model"):
        gather_grams_layerwise(bert, tokenizer, TEXTS, bert.select_targets(["all-linear"]))
    with pytest.raises(ValueError, match=r"'lm_head' is not inside a decoder layer \(model.layers.N"):
        gather_grams_layerwise(source, tokenizer, TEXTS, [*modules, "lm_head"])
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj"):
        gather_grams_layerwise(source, tokenizer, TEXTS, ["model.layers.9.mlp.up_proj"])


def tiny_from_config(config, tokenizer_dir: str, path: str) -> ModelSource:
    """A small model of another Llama-family type, saved with tiny-llama's tokenizer (same vocabulary)."""
    torch.manual_seed(0)
    getattr(transformers, config.architectures[0])(config).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    return ModelSource(path)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_mistral_and_qwen2_with_sliding_windows_match_the_whole_model(tiny, tmp_path, kind):
    """Sliding-window masks (mistral: every layer; qwen2: full attention in layer 0, sliding after) come from the
    model's own mask helpers, per layer: a window of 4 tokens changes every longer text's later layers."""
    source, tokenizer, _ = tiny
    shape = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=4)
    config = (transformers.MistralConfig(architectures=["MistralForCausalLM"], **shape) if kind == "mistral" else
              transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                       max_window_layers=1, **shape))
    other = tiny_from_config(config, source.path, str(tmp_path / kind))
    modules = other.select_targets(["all-linear"])
    whole = whole_model_grams(other, tokenizer, modules, batch_size=4)
    layerwise = gather_grams_layerwise(other, tokenizer, TEXTS, modules, batch_size=4)
    assert_same_grams(whole, layerwise, rtol=1e-5, scale_atol=1e-6)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    source = open_model("smollm2-135m", str(tmp_path_factory.mktemp("work")))  # the conversion: 20-130 s here
    return source, transformers.AutoTokenizer.from_pretrained(source.path)


@pytest.mark.slow  # as every SmolLM2 test: its one-time GGUF conversion takes minutes on a busy 2-core machine
def test_smollm2_layer_by_layer_gives_the_whole_models_grams(smollm2):
    source, tokenizer = smollm2
    assert source.config["dtype" if "dtype" in source.config else "torch_dtype"] == "bfloat16"
    modules = source.select_targets(["all-linear"])
    whole = whole_model_grams(source, tokenizer, modules, batch_size=4)
    layerwise = gather_grams_layerwise(source, tokenizer, TEXTS, modules, batch_size=4)
    # The hidden states are bf16 in both paths (the dtype the files have), and bf16 drift through 30 layers is not
    # small: measured here, the whole model with batches of 1 instead of 4 moves Gram entries by up to 3% of the
    # largest one, about as much as shifting every position by one (4%). A tolerance wide enough for another
    # computation could not tell a wrong position or mask from rounding, so this holds the two paths to the same
    # computation (the same kernels on the same bf16 inputs; measured bit for bit equal): only float32 rounding of
    # the Gram sums is allowed, rtol 1e-4 and 1e-5 of the largest entry.
    assert_same_grams(whole, layerwise, rtol=1e-4, scale_atol=1e-5)
    assert len({id(g) for g in layerwise.grams.values()}) == 4 * 30  # q/k/v, o, gate/up, down in each of 30 layers
