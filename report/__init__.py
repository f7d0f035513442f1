"""The analysis report: `write_report(EXP)` writes EXP/analysis/report.html and the PNGs it embeds.

One job per module: curves.py (val_acc per epoch), importance.py (Optuna importances and the top
two parameters), schedule.py (the best trial's lr per step), classes.py (the retrained model's
per-class results), leaderboard.py (table rows), html.py (the self-contained page), build.py
(puts them together).
"""
from report.build import write_report

__all__ = ["write_report"]
