"""val_acc against the global epoch for every trial: stages by marker, early stops drawn as such."""
from __future__ import annotations

from pathlib import Path

from matplotlib.lines import Line2D

from analysis.experiment import TrialRecord, rank
from analysis.outcome import (
    COMPLETED,
    EARLY_STOPPED,
    ERRORED,
    INTERRUPTED,
    OUT_OF_BUDGET,
    PRUNED,
)
from analysis.study import METRIC
from report.plots import COLOURS, OTHER, figure, save
from trainable.config import TrialConfig
from trainable.stages import plan_stages

STAGE_MARKERS = {1: "o", 2: "s", 3: "^"}
# line style and end marker per analysis.outcome name; anything else (errored, diverged, oom): dotted, x
STYLE = {COMPLETED: "-", EARLY_STOPPED: "-", PRUNED: "--", INTERRUPTED: "-.", OUT_OF_BUDGET: "-."}
END_MARKER = {PRUNED: "X", EARLY_STOPPED: "s", INTERRUPTED: ">", OUT_OF_BUDGET: ">"}
READING = [(COMPLETED, "ran every epoch"), (PRUNED, "pruned by ASHA"),
           (EARLY_STOPPED, "early-stopped by its own patience"), (INTERRUPTED, "cut short: interrupted / time budget"),
           (ERRORED, "errored / diverged / out of memory")]  # the legend's line styles
NAMED = len(COLOURS)  # the top trials get a colour and a legend entry; the rest are grey


def _end_marker(status: str) -> str:
    return "" if status == COMPLETED else END_MARKER.get(status, "x")


def stage_boundaries(config: dict) -> list[tuple[float, int]]:
    """(x, stage number) where each stage after the first starts: between two epochs."""
    return [(s.first_epoch + 0.5, s.number) for s in plan_stages(TrialConfig.from_dict(config))[1:]]


def plot_curves(trials: list[TrialRecord], path: Path) -> Path:
    ranked = rank(trials)
    order = ranked + [t for t in trials if t not in ranked and t.results]
    fig, ax = figure(10, 5.5)
    max_epoch, handles = 1, {}
    for i, t in enumerate(reversed(order)):  # best drawn last, on top
        pos = len(order) - 1 - i
        colour = COLOURS[pos] if pos < NAMED else OTHER
        rows = [r for r in t.results if "epoch" in r]
        if not rows:
            continue
        xs = [int(r["epoch"]) for r in rows]
        ys = [float(r.get(METRIC) or 0.0) for r in rows]
        max_epoch = max(max_epoch, *xs)
        status = t.status
        ax.plot(xs, ys, STYLE.get(status, ":"), color=colour, lw=2.0 if pos == 0 else 1.4,
                alpha=1.0 if pos < NAMED else 0.7, zorder=3 if pos < NAMED else 2)
        if pos < NAMED:
            handles[pos] = Line2D([], [], color=colour, ls=STYLE.get(status, ":"),
                                  marker=_end_marker(status), markersize=8, markeredgecolor="black",
                                  label=f"#{pos + 1} {t.trial_id} ({status}, {t.epochs_run}/{t.planned_epochs} ep)")
        for stage, marker in STAGE_MARKERS.items():
            pts = [(x, y) for x, y, r in zip(xs, ys, rows) if int(r.get("stage", 1)) == stage]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=28, color=colour, zorder=4)
        if _end_marker(status):
            ax.scatter([xs[-1]], [ys[-1]], marker=_end_marker(status), s=140, color=colour,
                       edgecolors="black", linewidths=0.8, zorder=5)
    if ranked:  # the best trial's stage plan as vertical lines (other trials' stages: marker shape)
        for x, number in stage_boundaries(ranked[0].config):
            ax.axvline(x, color="#555555", ls="-.", lw=1, zorder=1)
            ax.annotate(f"stage {number} starts\n(best trial)", (x, 0.0), xycoords=("data", "axes fraction"),
                        xytext=(4, 4), textcoords="offset points", va="bottom", fontsize=8, color="#444444")
    ax.set_xlim(0.5, max_epoch + 0.5)
    ax.set_xticks(range(1, max_epoch + 1) if max_epoch <= 30 else ax.get_xticks())
    ax.set_xlabel("epoch (global, across all stages)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"val_acc per epoch, {len(order)} trials"
                 + (f" (top {NAMED} coloured, rest grey)" if len(order) > NAMED else ""))
    ax.grid(alpha=0.3)
    if len(order) > NAMED:
        handles[NAMED] = Line2D([], [], color=OTHER, label=f"{len(order) - NAMED} more trials")
    fig.legend(handles=[handles[k] for k in sorted(handles)], title="trial (rank by best val_acc)", loc="outside right upper",
               fontsize=8, title_fontsize=9)
    styles = [Line2D([], [], color="black", ls=STYLE.get(status, ":"), marker=_end_marker(status), markersize=8,
                     label=label) for status, label in READING]
    styles += [Line2D([], [], color="black", ls="", marker=m, label=f"stage {s} epoch")
               for s, m in STAGE_MARKERS.items()]
    fig.legend(handles=styles, title="how to read", loc="outside right lower", fontsize=8, title_fontsize=9)
    return save(fig, path)
