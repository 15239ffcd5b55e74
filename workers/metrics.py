"""Task metrics in plain torch: accuracy, macro-F1, Matthews correlation, Pearson, Spearman, perplexity, EM."""

from __future__ import annotations

import math
import re

import torch


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return (preds == labels).float().mean().item() if labels.numel() else 0.0


def _confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).double()


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of F1 (a class with no predictions and no labels counts as 0, as sklearn's default)."""
    c = _confusion(preds, labels, num_classes)
    tp = c.diag()
    denom = c.sum(0) + c.sum(1)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return f1.mean().item()


def matthews_corrcoef(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The multi-class Matthews correlation R_K (equals sklearn's); 0 when undefined (constant predictions)."""
    c = _confusion(preds, labels, num_classes)
    t, p = c.sum(1), c.sum(0)
    n, correct = c.sum(), c.diag().sum()
    cov_ytyp = correct * n - (t * p).sum()
    cov_ypyp = n * n - (p * p).sum()
    cov_ytyt = n * n - (t * t).sum()
    denom = math.sqrt(cov_ypyp.item() * cov_ytyt.item())
    return cov_ytyp.item() / denom if denom > 0 else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = math.sqrt((x * x).sum().item() * (y * y).sum().item())
    return (x * y).sum().item() / denom if denom > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties given their average rank."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    return average[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x), _ranks(y))


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 700.0))


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _final_answer(text: str) -> str:
    """GSM8K style: the part after '####' when present."""
    return _normalize(text.split("####")[-1]) if "####" in text else _normalize(text)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after normalization (and after '####' when present)."""
    if not references:
        return 0.0
    hits = sum(_final_answer(p) == _final_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    preds, num_classes = logits.argmax(-1), logits.shape[-1]
    return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels, num_classes),
            "mcc": matthews_corrcoef(preds, labels, num_classes)}


def regression_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    preds, labels = preds.double().flatten(), labels.double().flatten()
    return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels),
            "mse": ((preds - labels) ** 2).mean().item()}
