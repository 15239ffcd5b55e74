"""The low-rank adapter that both LoRA layers of `workers.qlayers` own (LoRA, or QA-LoRA over quantization groups).

    lora:    s * B @ A @ h                 A: [r, in]
    qalora:  s * B @ A @ pool_L(h)         A: [r, in / L]

where h is the layer's input after dropout, pool_L averages it over groups of L inputs and s = alpha / r. The
factors are parameters of the owning layer, `lora_A` and `lora_B`: the names peft, the checkpoints and the cache
entries use (held by a submodule they would be renamed `<submodule>.lora_A`). The branch is ordinary autograd, so
its backward needs no code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.loftq import adapter_delta


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter's kind, rank and scale, and the math on its two factors."""

    kind: str  # "lora" or "qalora"
    rank: int
    scale: float  # s = alpha / r
    group_size: int = 1  # qalora: the L inputs one column of A pools over

    @property
    def alpha(self) -> float:
        """peft's lora_alpha: scale = alpha / r."""
        return self.scale * self.rank

    def new_factors(self, out_features: int, in_features: int) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) to start from: A Kaiming-uniform, B zero (QLoRA's init), so that the layer starts as its base."""
        a_in = in_features // self.group_size if self.kind == "qalora" else in_features
        lora_A = nn.Parameter(torch.zeros(self.rank, a_in))
        lora_B = nn.Parameter(torch.zeros(out_features, self.rank))
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        return lora_A, lora_B

    def branch(self, h: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """The adapter's output for the (dropped-out) layer input `h`, computed in h's dtype."""
        if self.kind == "qalora":
            h = h.reshape(*h.shape[:-1], -1, self.group_size).mean(dim=-1)
        return self.scale * F.linear(F.linear(h, lora_A.to(h.dtype)), lora_B.to(h.dtype))

    def delta(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """The [out, in] correction the factors add to the base weight (float32)."""
        return adapter_delta(lora_A.detach(), lora_B.detach(), self.scale, self.kind, self.group_size)


def load_factors(lora_A: nn.Parameter, lora_B: nn.Parameter, A: torch.Tensor, B: torch.Tensor) -> None:
    """Copy factors (e.g. LoftQ's) into a layer's `lora_A` / `lora_B`, after checking their shapes."""
    if A.shape != lora_A.shape or B.shape != lora_B.shape:
        raise ValueError(f"adapter shapes {tuple(A.shape)}, {tuple(B.shape)} do not match "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    with torch.no_grad():
        lora_A.copy_(A)
        lora_B.copy_(B)
