"""Image classification metrics as the ISIC scorer (``isic-challenge-scoring``) defines them,
computed on tensors during training.

Written here because torchmetrics' macro accuracy breaks argmax ties by taking the first
class, while ISIC counts a tie as wrong, and averages over every class instead of the
classes present in the truth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, multiclass_confusion_matrix


def decided(probs: Tensor) -> Tensor:
    """Predicted class per row, or -1 where several classes share the top probability."""
    top = probs.max(dim=1, keepdim=True).values
    ties = (probs == top).sum(dim=1) > 1
    return torch.where(ties, torch.full_like(ties, -1, dtype=torch.long), probs.argmax(dim=1))


def balanced_accuracy(probs: Tensor, target: Tensor) -> float:
    """Mean per-class recall over the classes present in ``target``; ties count as wrong."""
    pred = decided(probs)
    recalls = [
        int((pred[target == k] == k).sum()) / int((target == k).sum())
        for k in torch.unique(target).tolist()
    ]
    return sum(recalls) / len(recalls)


def per_class_auc(probs: Tensor, target: Tensor) -> list[float]:
    """One-vs-rest ROC AUC per class (NaN for a class without positives or negatives)."""
    out = []
    for k in range(probs.shape[1]):
        positive = target == k
        if positive.all() or not positive.any():
            out.append(math.nan)
        else:
            out.append(float(binary_auroc(probs[:, k].float(), positive.long())))
    return out


def confusion(probs: Tensor, target: Tensor) -> Tensor:
    """(K, K) counts, rows = truth, columns = argmax prediction."""
    return multiclass_confusion_matrix(probs.argmax(1), target, num_classes=probs.shape[1])
