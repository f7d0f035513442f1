"""The retrained model on the test set (analysis/test_predictions.pt and the class names in model.pt,
written by analysis/final.py): per-class accuracy and the confusions that cost most."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from report.plots import COLOURS, figure, legend_below, save


@dataclass
class ClassResults:
    names: list[str]
    accuracy: np.ndarray  # [classes] fraction of each class's test images predicted right
    support: np.ndarray  # [classes] test images per class
    confusion: np.ndarray  # [classes, classes] counts, rows = true class


def class_results(predictions: np.ndarray, labels: np.ndarray, names: list[str]) -> ClassResults:
    n = len(names)
    conf = np.zeros((n, n), dtype=np.int64)
    np.add.at(conf, (labels, predictions), 1)
    support = conf.sum(1)
    acc = np.divide(np.diag(conf), support, out=np.zeros(n), where=support > 0)
    return ClassResults(list(names), acc, support, conf)


def load_class_results(analysis: Path) -> ClassResults | None:
    """None when the retrain's files are not there (e.g. analyze.py --no-retrain)."""
    preds, model = analysis / "test_predictions.pt", analysis / "model.pt"
    if not (preds.exists() and model.exists()):
        return None
    p = torch.load(preds, map_location="cpu", weights_only=True)
    names = torch.load(model, map_location="cpu", weights_only=True)["fine_names"]
    return class_results(p["predictions"].numpy(), p["labels"].numpy(), names)


def ranked_classes(r: ClassResults, k: int = 10) -> tuple[list[int], list[int]]:
    """(k best, k worst) class indices among classes with test images; ties broken by name."""
    present = [i for i in range(len(r.names)) if r.support[i] > 0]
    order = sorted(present, key=lambda i: (-r.accuracy[i], r.names[i]))
    k = min(k, len(order) // 2) if len(order) < 2 * k else k
    return order[:k], order[::-1][:k]


def top_confusions(r: ClassResults, k: int = 10) -> list[tuple[int, int, int]]:
    """(true, predicted, count) for the k most frequent mistakes, largest first."""
    off = r.confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:k]
    pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape))]
    return [p for p in pairs if p[2] > 0]


def plot_classes(r: ClassResults, path: Path, k: int = 10) -> Path:
    best, worst = ranked_classes(r, k)
    fig, axes = figure(11, max(3.5, 0.32 * max(len(best), 1) + 1.6), ncols=2, squeeze=False)
    mean = float(np.diag(r.confusion).sum() / max(1, r.confusion.sum()))
    for ax, shown, kind, colour in ((axes[0][0], best, "best", COLOURS[2]), (axes[0][1], worst, "worst", COLOURS[3])):
        idx = shown[::-1]  # first at the top
        bars = ax.barh([r.names[i] for i in idx], [r.accuracy[i] for i in idx], color=colour,
                       label=f"test accuracy of a {kind} class")
        ax.bar_label(bars, labels=[f"{r.accuracy[i]:.0%} of {r.support[i]}" for i in idx],
                     padding=3, fontsize=8)
        ax.axvline(mean, color="black", ls="--", lw=1, label=f"overall test accuracy {mean:.1%}")
        ax.set_xlim(0, 1.25)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel("test accuracy of the class")
        ax.set_ylabel("class")
        ax.set_title(f"{len(idx)} {kind} classes{_tie(r, shown)}")
        ax.grid(axis="x", alpha=0.3)
    legend_below(fig, *axes[0])
    fig.suptitle("Retrained model: per-class test accuracy")
    return save(fig, path)


def _tie(r: ClassResults, shown: list[int]) -> str:
    """" (N classes tie at X%)" when more classes than shown share the accuracy of the first shown."""
    if not shown:
        return ""
    n = int(np.sum((r.accuracy == r.accuracy[shown[0]]) & (r.support > 0)))
    return f" ({n} classes tie at {r.accuracy[shown[0]]:.0%})" if n > len(shown) else ""


def plot_confusions(r: ClassResults, path: Path, k: int = 10) -> Path | None:
    pairs = top_confusions(r, k)
    if not pairs:
        return None
    pairs = pairs[::-1]
    fig, ax = figure(9, 0.38 * len(pairs) + 1.6)
    labels = [f"{r.names[t]} → {r.names[p]}" for t, p, _ in pairs]
    bars = ax.barh(labels, [c for _, _, c in pairs], color=COLOURS[4], label="test images")
    ax.bar_label(bars, labels=[f"{c} ({c / max(1, r.support[t]):.0%} of {r.names[t]})" for t, p, c in pairs],
                 padding=3, fontsize=8)
    ax.set_xlim(0, max(c for _, _, c in pairs) * 1.45)
    ax.set_xlabel("test images of the true class predicted as the other")
    ax.set_ylabel("true class → predicted class")
    ax.set_title(f"The {len(pairs)} confusions that cost most test accuracy")
    legend_below(fig, ax)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)
