"""How a worker builds its task model from a cache entry, and activation checkpointing under DeepSpeed.

`build_model` never materializes the full-precision model (parameters on the meta device, only the entry's
plain tensors and a fresh head allocated). Its models must compute exactly what the old build computed: the
architecture built in full with random weights, then the targets replaced and the entry loaded
(`full_build` below). Compared on tiny-llama (untied and tied embeddings), tiny-bert and the real MiniLM-L6.

Activation checkpointing must change nothing but memory: the same loss and the same adapter gradients with
and without it, through real DeepSpeed engines (one gloo process) at ZeRO 0-3.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from conftest import quantized_entry
from torch.utils._python_dispatch import TorchDispatchMode

from workers.model_source import ModelSource, materialize_tiny
from workers.qlayers import QuantLoraLinear
from workers.surgery import apply_quantized_base
from workers.train_loop import JobConfig, _entry_prefix, build_model
from workers.train_settings import AdapterSettings, TrainSettings, deepspeed_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
RANK, ALPHA = 4, 8


def job_for(source: ModelSource, init: str = "loftq", dropout: float = 0.0, **training) -> JobConfig:
    return JobConfig(model_config=source.config, base_ref=None, adapter_kind="lora",
                     adapter=AdapterSettings(rank=RANK, alpha=ALPHA, dropout=dropout, init=init),
                     training=TrainSettings(**training), task=None, tokenizer_dir="")


def build_on_meta(job: JobConfig, tensors: dict[str, torch.Tensor], num_labels: int | None) -> torch.nn.Module:
    return build_model(job.model_config, tensors, job.adapter, job.adapter_kind, num_labels,
                       activation_checkpointing=job.training.activation_checkpointing)


def full_build(job: JobConfig, tensors: dict[str, torch.Tensor], num_labels: int | None) -> torch.nn.Module:
    """The old build, as the reference: the whole model randomly initialized, then replaced and loaded."""
    cfg = transformers.AutoConfig.for_model(**job.model_config)
    if num_labels is not None:
        cfg.num_labels = num_labels
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    apply_quantized_base(model, tensors, rank=RANK, alpha=ALPHA, init=job.adapter.init,
                         prefix=_entry_prefix(model, tensors))
    return model


def all_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def logits(model: torch.nn.Module, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 20), generator=gen)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[ModelSource, dict]:
    source = materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))
    return source, quantized_entry(source)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> tuple[ModelSource, dict]:
    """A tiny Llama with lm_head tied to embed_tokens: its files hold the embedding only."""
    path = str(tmp_path_factory.mktemp("tied"))
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    source = ModelSource(path, name="tied-llama")
    assert "lm_head.weight" not in source.tensors
    return source, quantized_entry(source)


# ----------------------------------------------------------------------------------------------- meta build


@pytest.mark.parametrize("init", ["loftq", "qlora"])
def test_causal_lm_built_on_meta_computes_what_the_full_build_computes(tiny_llama, init):
    source, tensors = tiny_llama
    job = job_for(source, init=init)
    model, reference = build_on_meta(job, tensors, None), full_build(job, tensors, None)
    assert not [n for n, t in all_tensors(model).items() if t.is_meta]
    buffers = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():  # rotary inv_freq recomputed off meta, packed bases loaded
        assert torch.equal(buffers[name], buffer), name
    # same tensors, same ops: bitwise equal (a fresh LoRA has B = 0, so qlora's random A does not show)
    assert torch.equal(logits(model, 30522), logits(reference, 30522))
    layers = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(layers) == 14
    if init == "qlora":  # fresh factors: Kaiming-uniform A (bound 1 / sqrt(in)), B = 0
        for layer in layers:
            assert not layer.lora_B.any() and layer.lora_A.std() > 0
            assert layer.lora_A.abs().max() <= 1 / layer.in_features ** 0.5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # the model holds the entry's frozen tensors themselves (same dtype here): no second copy in the worker
    assert model.model.embed_tokens.weight.data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert down.qcodes.data_ptr() == tensors["model.layers.0.mlp.down_proj.qweight.codes"].data_ptr()


def test_tied_embeddings_stay_tied(tied_llama):
    source, tensors = tied_llama
    job = job_for(source)
    model = build_on_meta(job, tensors, None)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"].float())
    assert torch.equal(logits(model, 512), logits(full_build(job, tensors, None), 512))


def classification_case(name: str, tmp_path, minilm_dir: str) -> ModelSource:
    if name == "minilm-l6":
        return ModelSource(minilm_dir, name="minilm-l6")
    return materialize_tiny(name, str(tmp_path / "models"))


@pytest.mark.parametrize("name", ["tiny-bert", "minilm-l6"])
def test_classifier_gets_a_fresh_head_and_the_entry_for_the_rest(name, tmp_path, minilm_dir):
    source = classification_case(name, tmp_path, minilm_dir)
    tensors = quantized_entry(source)
    job = job_for(source)
    model, reference = build_on_meta(job, tensors, 3), full_build(job, tensors, 3)
    fresh = {n for n, _ in model.named_parameters()} - {"bert." + k for k in tensors}
    assert fresh == {"classifier.weight", "classifier.bias"}
    std = model.config.initializer_range  # transformers' init of a Linear: N(0, initializer_range), bias 0
    assert 0.7 * std < model.classifier.weight.std() < 1.3 * std and not model.classifier.bias.any()
    assert all(p.requires_grad for n, p in model.named_parameters() if n in fresh)
    buffers = dict(model.named_buffers())
    for buffer_name, buffer in reference.named_buffers():  # position_ids / token_type_ids rebuilt off meta
        assert torch.equal(buffers[buffer_name], buffer), buffer_name
    reference.classifier.load_state_dict(model.classifier.state_dict())  # the head is random in both builds
    assert torch.equal(logits(model, source.config["vocab_size"]), logits(reference, source.config["vocab_size"]))


def test_a_module_half_in_the_entry_keeps_what_the_entry_holds(tmp_path):
    """_init_weights initializes a module whole: a LayerNorm whose bias the entry lacks gets transformers' bias
    (0) and keeps the entry's weight, and the entry itself is left as it was."""
    source = materialize_tiny("tiny-bert", str(tmp_path / "models"))
    tensors = quantized_entry(source)
    del tensors["embeddings.LayerNorm.bias"]
    tensors["embeddings.LayerNorm.weight"] = 1 + 0.1 * torch.randn(128)  # not transformers' init (ones)
    before = {k: v.clone() for k, v in tensors.items()}
    model = build_on_meta(job_for(source), tensors, 3)
    norm = model.bert.embeddings.LayerNorm
    assert not norm.bias.any() and norm.bias.requires_grad  # fresh: initialized, and trained like the head
    assert torch.equal(norm.weight, tensors["embeddings.LayerNorm.weight"])
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)


class RandomFills(TorchDispatchMode):
    """Records the shape of every real (non-meta) tensor that a random initializer writes."""

    RANDOM = {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "randn", "rand", "randint"}

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.RANDOM and isinstance(out, torch.Tensor) and not out.is_meta:
            self.shapes.append(tuple(out.shape))
        return out


def test_no_weight_the_entry_replaces_is_randomly_initialized(tmp_path):
    source = materialize_tiny("tiny-bert", str(tmp_path / "models"))
    tensors, job = quantized_entry(source), job_for(source, init="qlora")
    with RandomFills() as meta_build:
        build_on_meta(job, tensors, 3)
    # only the fresh factors (A: [rank, in]) and the head (classifier.weight: [3, 128]) are drawn
    assert set(meta_build.shapes) == {(RANK, 128), (RANK, 256), (3, 128)}
    with RandomFills() as old_build:
        full_build(job, tensors, 3)
    assert {(128, 128), (256, 128), (512, 128)} <= set(old_build.shapes)  # the old build drew every weight


# ----------------------------------------------------------------------------------------------- checkpointing


def step_gradients(source, tensors, zero_stage: int, precision: str, checkpointing: bool):
    """One forward and backward through a DeepSpeed engine: the loss, the full adapter gradients (gathered
    from ZeRO partitions), and how many times the QuantLoraLinear layers started a forward (a pre-hook: the
    recomputation stops as soon as it has what backward needs, before the last layer of a block returns)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    job = job_for(source, dropout=0.1, zero_stage=zero_stage, precision=precision,
                  activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = build_on_meta(job, tensors, None)
    calls = []
    for layer in model.modules():
        if isinstance(layer, QuantLoraLinear):
            layer.register_forward_pre_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config={**deepspeed_config(job.training), "train_micro_batch_size_per_gpu": 2})
    ids = torch.randint(1, 30522, (2, 24), generator=torch.Generator().manual_seed(1))
    engine.train()
    torch.manual_seed(2)  # the same LoRA dropout masks in both runs (checkpointing replays them in its recompute)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters()
             if n.endswith(("lora_A", "lora_B"))}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"),
                                                  (3, "bf16")])
def test_activation_checkpointing_keeps_loss_and_adapter_gradients(process_group, tiny_llama, zero_stage,
                                                                   precision):
    source, tensors = tiny_llama
    before = {k: v.clone() for k, v in tensors.items()}
    loss, grads, calls = step_gradients(source, tensors, zero_stage, precision, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = step_gradients(source, tensors, zero_stage, precision, checkpointing=True)
    assert calls_ckpt == 2 * calls == 2 * 14  # each block ran again in backward: checkpointing was on
    assert len(grads) == 28 and all(g.abs().sum() > 0 for g in grads.values())  # every adapter gets gradient
    # the recomputation repeats the same ops on the same inputs: equal up to float rounding (tolerance 1e-6
    # relative to the largest gradient; bf16 rounds the same values the same way)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    scale = max(g.abs().max().item() for g in grads.values())
    assert max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads) <= 1e-6 * scale
    # the engines share the entry's frozen tensors (build_model does not copy them): none was written to
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)
