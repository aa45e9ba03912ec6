"""Classification metrics from predictions: accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix (rows: true class, columns: predicted), as scikit-learn defines them (a class with no
predictions has precision 0; macro-F1 is the unweighted mean of the per-class F1 over all classes)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: list[int], preds: list[int], num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return matrix


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def classification_metrics(labels: list[int], preds: list[int], class_names: list) -> dict:
    """{"accuracy", "macro_f1", "per_class": {name: {precision, recall, f1, support}}, "confusion_matrix"}."""
    k = len(class_names)
    matrix = confusion_matrix(labels, preds, k)
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = int(matrix.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()) if k else 0.0,
        "per_class": {str(name): {"precision": float(precision[i]), "recall": float(recall[i]),
                                  "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "confusion_matrix": matrix.tolist(),
        "labels": [str(c) for c in class_names],
        "examples": total,
    }
