"""Task metrics in plain torch: accuracy, macro-F1, Matthews correlation, Pearson, Spearman, perplexity, exact match.

Every function takes 1-D tensors (or lists of strings for exact match) and returns a Python float. Where a
metric is undefined (a constant prediction for correlations) it returns 0.0 instead of NaN, so a leaderboard
can still sort and average it.
"""

from __future__ import annotations

import math
import re

import torch


def _check_same_length(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"predictions and labels differ in length: {a.shape[0]} vs {b.shape[0]}")


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to their label (0.0 for no examples)."""
    _check_same_length(preds, labels)
    return (preds == labels).double().mean().item() if labels.numel() else 0.0


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C[i, j] = number of examples with label i predicted as j, as float64 [num_classes, num_classes]."""
    _check_same_length(preds, labels)
    preds, labels = preds.long().flatten(), labels.long().flatten()
    for name, t in (("predictions", preds), ("labels", labels)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must be class ids in [0, {num_classes}), got {t.min().item()}..{t.max().item()}")
    index = labels * num_classes + preds  # one bincount instead of a loop over classes
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).double()


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions.

    This equals sklearn's `f1_score(labels, preds, average="macro")`: a class absent from both is left out
    (it would otherwise count as F1 = 0 and punish a small eval set for not containing it).
    """
    c = confusion_matrix(preds, labels, num_classes)
    tp, predicted, actual = c.diag(), c.sum(0), c.sum(1)
    present = (predicted + actual) > 0
    if not present.any():
        return 0.0
    f1 = 2 * tp[present] / (predicted[present] + actual[present])
    return f1.mean().item()


def matthews_corrcoef(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Multi-class Matthews correlation R_K (Gorodkin 2004), equal to sklearn's `matthews_corrcoef`.

    With C the confusion matrix, t = row sums, p = column sums, s = total and c = trace:
    R_K = (c*s - t.p) / sqrt((s^2 - p.p) * (s^2 - t.t)); 0.0 when the denominator is 0 (e.g. constant predictions).
    """
    c = confusion_matrix(preds, labels, num_classes)
    t, p = c.sum(1), c.sum(0)
    s, correct = c.sum(), c.diag().sum()
    cov_tp = correct * s - (t * p).sum()
    cov_pp = s * s - (p * p).sum()
    cov_tt = s * s - (t * t).sum()
    denom = math.sqrt(cov_pp.item() * cov_tt.item())
    return cov_tp.item() / denom if denom > 0 else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0.0 when either side is constant (where it is undefined)."""
    _check_same_length(x, y)
    x = x.double().flatten()
    y = y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt((x * x).sum().item() * (y * y).sum().item())
    return (x * y).sum().item() / denom if denom > 0 else 0.0


def rank_average(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks where tied values share the average of their ranks (scipy's `rankdata` 'average')."""
    _, inverse, counts = torch.unique(x.double().flatten(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the rank of the last member of each tie group
    average = last - (counts.double() - 1) / 2
    return average[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson on average ranks, so ties are handled as scipy does."""
    _check_same_length(x, y)
    return pearson(rank_average(x), rank_average(y))


def perplexity(mean_nll: float) -> float:
    """exp of the mean token negative log-likelihood (capped so it cannot overflow to inf)."""
    return math.exp(min(mean_nll, 700.0))


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> str | None:
    """The last number in `text`, canonical: '1,000.50' -> '1000.5', '42.0' -> '42'."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def answer_matches(prediction: str, reference: str) -> bool:
    """One exact-match decision.

    Equal after normalization (strip, lowercase, collapse whitespace) is a hit. GSM8K style, when the reference
    has a final answer after '####': the prediction's text after its own '####' may equal it, or the last number
    in the prediction (after '####' if it has one, else anywhere) may equal the reference's number.
    """
    if _normalize(prediction) == _normalize(reference):
        return True
    if "####" not in reference:
        return False
    final = _normalize(reference.rsplit("####", 1)[1])
    predicted = _normalize(prediction.rsplit("####", 1)[1]) if "####" in prediction else _normalize(prediction)
    if predicted == final:
        return True
    number = _last_number(final)
    return number is not None and number == _last_number(predicted)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions that match their reference (see `answer_matches`); 0.0 for no examples."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} vs {len(references)}")
    if not references:
        return 0.0
    return sum(answer_matches(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy, macro_f1 and mcc from logits [n, num_classes] and integer labels [n]."""
    preds, num_classes = logits.argmax(-1), logits.shape[-1]
    return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels, num_classes),
            "mcc": matthews_corrcoef(preds, labels, num_classes)}


def regression_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """pearson, spearman and mse of predictions against float labels (both flattened)."""
    preds, labels = preds.double().flatten(), labels.double().flatten()
    _check_same_length(preds, labels)
    mse = ((preds - labels) ** 2).mean().item() if labels.numel() else 0.0
    return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels), "mse": mse}
