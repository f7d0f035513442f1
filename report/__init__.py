"""The analysis report: `write_report(EXP)` writes EXP/analysis/report.html and the PNGs it embeds.

One job per module: versus.py (the winner against the best recipe), curves.py (val_acc per epoch),
importance.py (Optuna importances and the top two parameters), leaderboard.py (table rows),
schedule.py (the best trial's lr per step), classes.py (the retrained model's per-class results),
comparison.py (the recipes' table), plots.py and html.py (figures and the self-contained page),
build.py (puts them together).
"""
from report.build import write_report

__all__ = ["write_report"]
