"""Exports: PEFT adapters that peft loads with identical logits, merged models (LoRA and QA-LoRA)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from workers.export import export_peft_adapter, export_qalora_merged, merged_fp_model
from workers.matrix_worker import MatrixJob, MatrixWorker
from workers.quant import QuantSpec
from workers.surgery import apply_quantized_base

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, num_labels=3)


def quantized_classifier(spec: QuantSpec, method: str, seed: int = 0):
    """A tiny BERT classifier whose encoder linears are LoftQ-quantized, with 'trained' adapters and head."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**CONFIG)
    model = transformers.BertForSequenceClassification(config).eval()
    bert_state = model.bert.state_dict()
    tensors = {k: v for k, v in bert_state.items()}
    worker = MatrixWorker()
    for name, module in model.bert.named_modules():
        if isinstance(module, torch.nn.Linear) and "pooler" not in name:
            result = worker.quantize(MatrixJob(name, spec, rank=4, iters=2, method=method), module.weight)
            tensors.update(result.tensors)
            del tensors[name + ".weight"]
    adapter = "qalora" if method == "qalora" else "lora"
    apply_quantized_base(model, tensors, rank=4, alpha=8, adapter=adapter, prefix="bert.")
    with torch.no_grad():  # stand-in for training: adapters and head move away from their start
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "classifier.weight")):
                p.add_(torch.randn_like(p) * 0.05)
    return model, config


def test_peft_loads_our_adapter_over_the_dequantized_base_with_identical_logits(tmp_path):
    from peft import PeftModel

    model, config = quantized_classifier(QuantSpec("nf", 4, 32), "loftq")
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    out = export_peft_adapter(model, str(tmp_path / "adapter"), task_type="SEQ_CLS", provenance={"base": "k1"},
                              trainable_modules=["classifier"])
    assert {"adapter_config.json", "adapter_model.safetensors", "loftune.json"} <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "loftune.json")))["base"] == "k1"
    base = transformers.BertForSequenceClassification(config).eval()
    base.load_state_dict(merged_fp_model(model, with_adapter=False).state_dict())
    loaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = loaded(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # and the merged full-precision model agrees too
    with torch.no_grad():
        assert torch.allclose(merged_fp_model(model)(ids).logits, ours, atol=1e-5)


def test_qalora_export_is_a_merged_quantized_model_with_the_same_outputs(tmp_path):
    model, config = quantized_classifier(QuantSpec("int", 4, 16, "float32"), "qalora")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    codes_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("qcodes")}
    out = export_qalora_merged(model, str(tmp_path / "merged"), model_config=config.to_dict(), provenance={})
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert not any(k.endswith(("lora_A", "lora_B")) for k in tensors)
    for key, codes in codes_before.items():
        assert torch.equal(tensors[key.replace(".qcodes", ".qweight.codes")], codes)
    fresh = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG)).eval()
    bert = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    apply_quantized_base(fresh, bert, rank=0, prefix="bert.")
    fresh.classifier.load_state_dict({"weight": tensors["classifier.weight"], "bias": tensors["classifier.bias"]})
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, before, atol=1e-5)


def test_peft_export_refuses_qalora(tmp_path):
    model, _ = quantized_classifier(QuantSpec("int", 4, 16), "qalora")
    with pytest.raises(ValueError, match="QA-LoRA"):
        export_peft_adapter(model, str(tmp_path), task_type="SEQ_CLS", provenance={})
