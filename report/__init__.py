"""The analysis report: `write_report(EXP)` writes EXP/analysis/report.html (one self-contained page)
and the PNGs it embeds; build.py puts the sections of the other modules together."""
from report.build import write_report

__all__ = ["write_report"]
