"""The chunked causal-LM loss is transformers' loss, with the same adapter gradients, and never holds the
[tokens, vocab] logits: at most one chunk's."""

from __future__ import annotations

import pytest
import torch
from conftest import quantized_entry

from workers.lm_loss import causal_lm_loss, use_chunked_loss
from workers.model_source import materialize_tiny
from workers.task_encoding import IGNORE_INDEX
from workers.train_loop import build_model
from workers.train_settings import AdapterSettings

VOCAB = 30522


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    source = materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))
    return source.config, quantized_entry(source)


def fresh_model(entry, checkpointing: bool = False):
    config, tensors = entry
    torch.manual_seed(0)
    model = build_model(config, tensors, AdapterSettings(rank=4, alpha=8, init="qlora"), "lora", None,
                        activation_checkpointing=checkpointing)
    with torch.no_grad():  # B != 0, so that every adapter gets a gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model.train()


def batch(prompt_tokens: int = 0):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 40), generator=gen)
    labels = ids.clone()
    labels[:, :prompt_tokens] = IGNORE_INDEX  # a prompt -> answer task scores the answer only
    labels[2, 30:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    return ids, mask, labels


def loss_and_grads(model, loss):
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("prompt_tokens,chunk,recompute", [(0, 7, True), (0, 10_000, True), (25, 4, True),
                                                           (0, 7, False), (25, 4, False)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_loss_is_transformers_loss_with_the_same_gradients(entry, prompt_tokens, chunk, recompute,
                                                                  checkpointing):
    ids, mask, labels = batch(prompt_tokens)
    reference = fresh_model(entry, checkpointing)
    ref_loss, ref_grads = loss_and_grads(reference, reference(input_ids=ids, attention_mask=mask, labels=labels).loss)
    model = fresh_model(entry, checkpointing)
    loss, grads = loss_and_grads(model, causal_lm_loss(model, ids, labels, mask, chunk_tokens=chunk,
                                                       recompute=recompute))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 14
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_model_call_uses_it_in_training_only(entry):
    ids, mask, labels = batch(10)
    model = fresh_model(entry)
    assert use_chunked_loss(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the chunked path
    torch.testing.assert_close(out.loss, causal_lm_loss(model, ids, labels, mask))
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (3, 40, VOCAB)


def test_no_tensor_of_the_logits_size_is_kept_for_backward(entry):
    ids, mask, labels = batch(0)
    model = fresh_model(entry)
    full_logits = ids.numel() * VOCAB
    for compute, most in ((lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss, None),
                          (lambda: causal_lm_loss(model, ids, labels, mask, chunk_tokens=16), 16 * VOCAB)):
        largest = 0

        def pack(t):
            nonlocal largest
            largest = max(largest, t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compute().backward()
        if most is None:
            assert largest >= full_logits  # transformers keeps the whole logits (the reason for this module)
        else:
            assert largest <= most


def test_other_architectures_keep_their_forward(tmp_path):
    source = materialize_tiny("tiny-bert", str(tmp_path / "models"))
    adapter = AdapterSettings(rank=4, alpha=8, init="qlora")
    model = build_model(source.config, quantized_entry(source), adapter, "lora", 2)
    forward = model.forward
    assert not use_chunked_loss(model) and model.forward == forward
