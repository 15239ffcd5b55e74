"""workers/surgery.py: a cache entry's tensors put into a model.

Entries are made in this process by the build's own per-matrix worker (MatrixWorker, no Ray) from a tiny BERT:
which modules become targets, which tensors are the untouched rest, the layers that replace the linears (their
codes are the entry's own tensors, their factors rescaled to alpha / rank), the full-precision control's layers,
the meta-device build, and the full-precision state dict that an export merges into.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import transformers
from conftest import dequantized_state_dict
from safetensors.torch import load_file
from torch import nn

from workers.entry_format import (
    adapter_for,
    factor_names,
    fp_weight_name,
    full_precision_modules,
    is_plain,
    quantized_modules,
    qweight_names,
    qweight_parts,
    qweight_tensors,
)
from workers.export import export_qalora_merged
from workers.matrix_worker import MatrixJob, MatrixWorker
from workers.qlayers import FullPrecisionLoraLinear, QuantLoraLinear
from workers.quant import QuantSpec, dequantize
from workers.surgery import (
    apply_quantized_base,
    empty_parameters,
    init_missing,
    load_plain_tensors,
    quantized_tensor,
)

CONFIG = transformers.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, num_labels=3)
NF4 = QuantSpec("nf", 4, 32)
INT4 = QuantSpec("int", 4, 16, "float32")
RANK = 4
QUERY = "encoder.layer.0.attention.self.query"


def bert() -> transformers.BertModel:
    torch.manual_seed(0)
    return transformers.BertModel(CONFIG).eval()


def encoder_linears(model: nn.Module) -> list[str]:
    """The linears a build targets here: every encoder linear (the pooler stays in full precision)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n)


def entry_of(model: nn.Module, spec: QuantSpec | None, iters: int = 1, method: str = "loftq") -> dict:
    """The tensors a cache entry of `model` holds: each encoder linear built by MatrixWorker (quantized with
    rank-4 LoftQ factors, or the bf16 control's weight for `spec` None), every other tensor as it is."""
    worker, tensors = MatrixWorker(), dict(model.state_dict())
    for name in encoder_linears(model):
        job = MatrixJob(name, spec, RANK, iters if spec is not None else 0, method if spec is not None else "lora")
        tensors.update(worker.quantize(job, tensors.pop(name + ".weight")).tensors)
    return tensors


@pytest.fixture(scope="module")
def nf4_entry() -> dict:
    return entry_of(bert(), NF4)


def test_entry_names_parse_back_into_what_wrote_them(nf4_entry):
    parts = quantized_tensor(nf4_entry, QUERY).state_dict()
    stored = qweight_tensors(QUERY, parts)
    assert set(stored) == {QUERY + ".qweight." + p for p in ("codes", "scales", "qmeta")}  # NF: no zero points
    parsed = qweight_parts({**stored, "other.qweight.codes": None}, QUERY)
    assert parsed.keys() == parts.keys() and all(parsed[k] is parts[k] for k in parts)  # the same tensors
    assert factor_names(QUERY) == (QUERY + ".lora_A", QUERY + ".lora_B") and fp_weight_name("m") == "m.fpweight"
    assert [adapter_for(m) for m in ("loftq", "qlora", "qalora", "lora", None)] == ["lora", "lora", "qalora",
                                                                                     "lora", "lora"]


def test_targets_are_the_modules_with_a_stored_base(nf4_entry):
    model = bert()
    names = encoder_linears(model)
    assert quantized_modules(nf4_entry) == names and full_precision_modules(nf4_entry) == []
    assert quantized_modules(["a.qweight.codes", "a.qweight.qmeta", "b.qweight.codes"]) == ["a"]  # qmeta marks one
    assert full_precision_modules(["x.fpweight", "x.bias", "y.weight"]) == ["x"]
    targets = apply_quantized_base(model, nf4_entry, rank=RANK, alpha=8)
    assert targets == names and len(targets) == 12  # 6 linears per layer, 2 layers
    assert all(type(model.get_submodule(t)) is QuantLoraLinear for t in targets)
    assert type(model.pooler.dense) is nn.Linear  # no stored base: left as it was


def test_rest_is_every_tensor_that_is_not_a_base_part_a_control_weight_or_a_factor(nf4_entry):
    assert not any(is_plain(n) for n in (*qweight_names(QUERY), *factor_names(QUERY), fp_weight_name(QUERY)))
    assert all(is_plain(n) for n in (QUERY + ".bias", "embeddings.word_embeddings.weight", "x.lora_Anything"))
    rest = {n for n in nf4_entry if is_plain(n)}
    model = bert()
    linear_weights = {t + ".weight" for t in encoder_linears(model)}
    assert rest == set(model.state_dict()) - linear_weights  # the biases of targets are rest too
    fresh = bert()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert set(load_plain_tensors(fresh, nf4_entry)) == rest
    for name in rest:
        assert torch.equal(fresh.state_dict()[name], nf4_entry[name])


def test_quantized_layer_holds_the_entry_codes_and_dequantizes_to_them_exactly(nf4_entry):
    model = bert()
    apply_quantized_base(model, nf4_entry, rank=RANK, alpha=8)
    layer = model.get_submodule(QUERY)
    assert layer.qcodes.data_ptr() == nf4_entry[QUERY + ".qweight.codes"].data_ptr()  # the entry's tensor, no copy
    assert (layer.out_features, layer.in_features) == (64, 64) and layer.spec == NF4
    assert torch.equal(layer.dequantized_weight(), dequantize(quantized_tensor(nf4_entry, QUERY)))
    assert torch.equal(layer.bias, nf4_entry[QUERY + ".bias"])
    assert layer.lora_A.shape == (RANK, 64) and layer.lora_B.shape == (64, RANK)
    names = dict(model.named_parameters())
    assert {QUERY + s for s in (".lora_A", ".lora_B", ".bias")} <= set(names) and QUERY + ".weight" not in names
    assert {QUERY + s for s in (".qcodes", ".qscales")} <= set(dict(model.named_buffers()))


def test_loftq_factors_are_rescaled_to_alpha_over_rank(nf4_entry):
    model = bert()
    apply_quantized_base(model, nf4_entry, rank=RANK, alpha=16)
    layer, scale = model.get_submodule(QUERY), 16 / RANK
    a_name, b_name = factor_names(QUERY)
    assert layer.scale == scale
    assert torch.equal(layer.lora_A.detach(), nf4_entry[a_name] / math.sqrt(scale))
    assert torch.equal(layer.lora_B.detach(), nf4_entry[b_name] / math.sqrt(scale))
    # the correction the layer adds is LoftQ's, at scale 1
    assert torch.allclose(layer.delta_weight(), nf4_entry[b_name] @ nf4_entry[a_name], atol=1e-6)


def test_qlora_init_ignores_the_factors_and_starts_at_the_base(nf4_entry):
    model = bert()
    apply_quantized_base(model, nf4_entry, rank=RANK, alpha=8, init="qlora")
    layer = model.get_submodule(QUERY)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert not torch.equal(layer.lora_A.detach(), nf4_entry[QUERY + ".lora_A"] / math.sqrt(2))


def test_missing_factors_and_unknown_init_are_errors(nf4_entry):
    no_factors = entry_of(bert(), NF4, iters=0, method="qlora")
    assert not any(n.endswith((".lora_A", ".lora_B")) for n in no_factors)
    with pytest.raises(ValueError, match="no LoftQ factors for rank 4"):
        apply_quantized_base(bert(), no_factors, rank=RANK, init="loftq")
    with pytest.raises(ValueError, match="init: expected 'loftq' or 'qlora'"):
        apply_quantized_base(bert(), nf4_entry, rank=RANK, init="pissa")
    with pytest.raises(ValueError):  # the factors stored are rank 4
        apply_quantized_base(bert(), nf4_entry, rank=8)


def test_qalora_layers_pool_their_input_over_the_quantization_groups():
    entry = entry_of(bert(), INT4, method="qalora")
    model = bert()
    apply_quantized_base(model, entry, rank=RANK, alpha=8, adapter="qalora")
    layer = model.get_submodule("encoder.layer.0.intermediate.dense")  # [128, 64]
    assert layer.adapter == "qalora" and layer.lora_A.shape == (RANK, 64 // INT4.group_size)
    assert torch.equal(layer.qzeros, entry["encoder.layer.0.intermediate.dense.qweight.zeros"])


def test_full_precision_control_targets_are_plain_lora_over_the_stored_weight():
    model = bert()
    reference, names = dict(model.state_dict()), encoder_linears(model)
    entry = entry_of(model, None)
    assert full_precision_modules(entry) == names and quantized_modules(entry) == []
    assert not any(n.endswith((".lora_A", ".lora_B")) for n in entry)
    targets = apply_quantized_base(model, entry, rank=RANK, alpha=8, init="qlora")
    layer = model.get_submodule(QUERY)
    assert type(layer) is FullPrecisionLoraLinear and targets == names
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.data_ptr() == entry[QUERY + ".fpweight"].data_ptr()
    assert torch.equal(layer.dequantized_weight(), reference[QUERY + ".weight"].to(torch.bfloat16).float())
    assert torch.count_nonzero(layer.lora_B) == 0
    with pytest.raises(ValueError, match="bits-16 control entry"):
        apply_quantized_base(bert(), entry, rank=RANK, init="loftq")
    with pytest.raises(ValueError):  # QA-LoRA pools over quantization groups: a bf16 weight has none
        apply_quantized_base(bert(), entry, rank=RANK, init="qlora", adapter="qalora")


def test_prefix_maps_entry_names_onto_a_task_model(nf4_entry):
    torch.manual_seed(1)
    classifier = transformers.BertForSequenceClassification(CONFIG).eval()
    head = classifier.classifier.weight.detach().clone()
    targets = apply_quantized_base(classifier, nf4_entry, rank=RANK, alpha=8, prefix="bert.")
    assert all(type(classifier.get_submodule("bert." + t)) is QuantLoraLinear for t in targets)
    assert torch.equal(classifier.bert.embeddings.word_embeddings.weight,
                       nf4_entry["embeddings.word_embeddings.weight"])
    assert torch.equal(classifier.classifier.weight, head)  # not in the entry: untouched
    with pytest.raises(ValueError, match="not in the model"):
        load_plain_tensors(transformers.BertForSequenceClassification(CONFIG), nf4_entry)  # no prefix


def test_a_tensor_of_the_wrong_shape_is_an_error(nf4_entry):
    bad = {**nf4_entry, "embeddings.word_embeddings.weight": torch.zeros(10, 64)}
    with pytest.raises(ValueError, match=r"embeddings.word_embeddings.weight: shape \(10, 64\)"):
        load_plain_tensors(bert(), bad)


def test_meta_build_allocates_only_what_the_entry_lacks(nf4_entry):
    register = nn.Module.register_parameter
    with empty_parameters():
        model = transformers.BertForSequenceClassification(CONFIG)
    assert nn.Module.register_parameter is register  # patched only inside the block
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    apply_quantized_base(model, nf4_entry, rank=RANK, alpha=8, prefix="bert.")
    assert init_missing(model) == ["classifier.weight", "classifier.bias"]  # the fresh head, nothing else
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert not model.classifier.weight.isnan().any() and torch.count_nonzero(model.classifier.bias) == 0
    # a loaded tensor is the entry's own (frozen: held once), not a copy
    assert model.bert.embeddings.word_embeddings.weight.data_ptr() == \
        nf4_entry["embeddings.word_embeddings.weight"].data_ptr()


def test_dequantized_state_dict_is_a_plain_model_state_dict(nf4_entry):
    model = bert()
    state = dequantized_state_dict(nf4_entry)
    assert set(state) == set(model.state_dict())  # no base parts, factors or control weights left
    for module in encoder_linears(model):
        assert torch.equal(state[module + ".weight"], dequantize(quantized_tensor(nf4_entry, module)))
    model.load_state_dict(state, strict=True)
    quantized = bert()
    apply_quantized_base(quantized, nf4_entry, rank=0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).last_hidden_state, quantized(ids).last_hidden_state, atol=1e-5)
    control = entry_of(bert(), None)
    assert torch.equal(dequantized_state_dict(control, torch.bfloat16)[QUERY + ".weight"],
                       control[QUERY + ".fpweight"])


def test_merged_qalora_export_reads_back_as_an_entry(tmp_path):
    """export_qalora_merged writes the entry's own layout: surgery finds the same targets and codes in it, and
    the merged zero points reproduce the trained layer with no adapter."""
    entry = entry_of(bert(), INT4, method="qalora")
    model = bert()
    targets = apply_quantized_base(model, entry, rank=RANK, alpha=8, adapter="qalora")
    with torch.no_grad():
        for t in targets:
            model.get_submodule(t).lora_B.add_(0.05)  # stand-in for training
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(ids).last_hidden_state
    out = export_qalora_merged(model, str(tmp_path / "merged"), model_config=CONFIG.to_dict(), provenance={})
    merged = load_file(os.path.join(out, "model.safetensors"))
    assert quantized_modules(merged) == targets
    assert not any(n.endswith((".lora_A", ".lora_B")) for n in merged)
    assert all(torch.equal(merged[t + ".qweight.codes"], entry[t + ".qweight.codes"]) for t in targets)
    assert not torch.equal(merged[QUERY + ".qweight.zeros"], entry[QUERY + ".qweight.zeros"])  # folded in
    fresh = bert()
    apply_quantized_base(fresh, merged, rank=0)
    with torch.no_grad():
        assert torch.allclose(fresh(ids).last_hidden_state, trained, atol=1e-4)
