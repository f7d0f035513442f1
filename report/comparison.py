"""The comparison table (search best vs hand-made recipes) as text and as a report section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analysis.baselines import COMPARISON
from analysis.experiment import text_table
from report import html as h

HEAD = ["recipe", "backbone", "pretrained", "input px", "epochs run/planned", "train images",
        "training time", "test acc", "test coarse acc"]
NUMERIC = {3, 4, 5, 6, 7, 8}


def cells(r: dict[str, Any]) -> list[str]:
    about = [r["recipe"], r["backbone"], "yes" if r["pretrained"] else "no", str(r["input_size"])]
    if r.get("error"):
        return about + [f"-/{r['planned_epochs']}", "-", "-", "failed", r["error"][:60]]
    return about + [f"{r['epochs']}/{r['planned_epochs']}", str(r["train_images"]), f"{r['train_seconds']:.0f} s",
                    h.pct(r["test_acc"]), h.pct(r["test_coarse_acc"])]


def comparison_text(rows: list[dict[str, Any]]) -> str:
    return text_table(HEAD, [cells(r) for r in rows], numeric=NUMERIC)


def section(out_dir: Path, data: str) -> str:
    title = "Search best vs hand-made recipes"
    p = Path(out_dir) / COMPARISON
    if not p.exists():
        return h.section(title, h.note("No comparison yet: run analyze.py EXP --baselines NAME[,NAME...] "
                                       "(run_search.py --list-spaces lists the recipes)."))
    comp = json.loads(p.read_text())
    best_first = bool(comp["rows"]) and comp["rows"][0]["recipe"].startswith("search best")
    notes = [f"Every row trained on {data} (same data, same split) and was tested once on its test file."]
    if comp.get("epochs_scale", 1) != 1:
        notes.append(f"Recipe schedules shrunk by --epochs-scale {comp['epochs_scale']} (the search's best "
                     f"keeps its own).")
    if comp.get("overrides"):
        notes.append(f"Recipe overrides: {' '.join(comp['overrides'])}.")
    notes.append("Recipes that train on val_loss (early stopping, reduce-on-plateau) train on the search's "
                 "train split and watch its val split; the others train on train+val. Coarse accuracy: "
                 "a fine prediction in the right superclass.")
    return h.section(title, h.table(HEAD, [cells(r) for r in comp["rows"]], numeric=NUMERIC,
                                    highlight={0} if best_first else set()),
                     h.note(" ".join(notes)))
