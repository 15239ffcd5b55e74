"""The causal-LM training loss without the [tokens, vocab] logits in memory.

transformers computes `logits = lm_head(hidden)` for every token, casts them to fp32 and takes the
cross-entropy; with 4 x 256 tokens and a 32,000-word vocabulary the logits, their fp32 copy, the log-softmax and
their gradients are several hundred MB at the step's peak: as much as a 4-bit 7B block. Here the head and the
loss run over chunks of the tokens that are scored (prompt tokens of a prompt -> answer task are skipped
altogether), each chunk under activation checkpointing, so at most one chunk's logits exist at a time, in
forward and in backward. The value is transformers' loss (the mean over tokens whose label is not ignored).

Only for architectures whose forward is exactly `lm_head(decoder(x))` (no logit soft-capping or scaling).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from workers.task_encoding import IGNORE_INDEX

CHUNKED_LOSS_MODELS = ("llama", "mistral", "qwen2", "qwen3")
CHUNK_TOKENS = 256


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_tokens: int = CHUNK_TOKENS,
                   recompute: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (a *ForCausalLM) over the tokens whose label is not ignored.

    `recompute` runs each chunk under checkpointing (one chunk's logits at a time, the head's matmul twice);
    without it the chunks' logits are kept for backward, as transformers keeps them, but only for scored tokens.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][scored], targets[scored]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if recompute:
            total = total + checkpoint(_summed_cross_entropy, head, h[part], y[part], use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(head, h[part], y[part])
    return total / max(y.numel(), 1)


def _summed_cross_entropy(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def use_chunked_loss(model: torch.nn.Module, recompute: bool = True) -> bool:
    """Make `model(..., labels=...)` in training mode return the chunked loss (and no logits); evaluation and
    generation keep transformers' forward. Returns False (and changes nothing) for other architectures.
    `recompute` as in `causal_lm_loss` (a worker recomputes when activation checkpointing is on)."""
    if getattr(model.config, "model_type", None) not in CHUNKED_LOSS_MODELS:
        return False
    full_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None or not self.training or kwargs:
            return full_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=causal_lm_loss(self, input_ids, labels, attention_mask,
                                                          recompute=recompute))

    model.forward = types.MethodType(forward, model)
    return True
