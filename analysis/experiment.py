"""An experiment's trials read from Tune's own files (params.json, result.json: no Ray needed), the
best (by its best epoch, never a failed trial) and its exported config; the tables that show them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from analysis.command import command
from analysis.outcome import (COMPLETED, EARLY_STOPPED, TrialView, failure_status, finite_loss, on_a_fraction, outcome, planned_epochs,
                              read_ends, screen_order)
from analysis.study import METRIC
from trainable import atomic
from trainable.config import TrialConfig
from trainable.errors import UserError

SETTINGS_FILE = "search_settings.yaml"


@dataclass
class TrialRecord:
    trial_id: str
    path: Path
    config: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""  # last line of Tune's error.txt, when the trial failed
    ended_by_search: str = ""  # analysis.outcome.INTERRUPTED / OUT_OF_BUDGET, from trial_ends.json

    @property
    def planned_epochs(self) -> int:
        return planned_epochs(self.config) or 0

    @property
    def epochs_run(self) -> int:
        return max((int(r.get("epoch", 0)) for r in self.results), default=0)

    @property
    def full_fidelity(self) -> bool:
        """Trained on all of the training split (a screen trial, planning/plan.py, trains on a fraction) and ran its
        whole plan or early-stopped itself: not pruned at a rung nor cut short by the search's end, as the
        searcher's incumbent (planning/incumbent.py) is chosen."""
        return not on_a_fraction(self.config) and self.status in (COMPLETED, EARLY_STOPPED)

    @property
    def failure(self) -> dict[str, Any] | None:
        """The result row that ended the trial with a failure (diverged, oom), if any."""
        return next((r for r in self.results if failure_status(r)), None)

    @property
    def reason(self) -> str:
        """Why the trial failed: its failure row's error, else the last line of Tune's error.txt."""
        return str((self.failure or {}).get("error") or self.error)

    @property
    def best(self) -> dict[str, Any] | None:
        """The result row of the best epoch (highest val_acc); None for a failed trial or one without any."""
        if self.failure is not None:
            return None
        rows = [r for r in self.results if isinstance(r.get(METRIC), (int, float)) and math.isfinite(r[METRIC])]
        return max(rows, key=lambda r: r[METRIC]) if rows else None

    @property
    def status(self) -> str:
        """How the trial ended: analysis.outcome's rule."""
        last = self.failure or (self.results[-1] if self.results else {})
        return outcome(TrialView(self.config, last, errored=bool(self.error), ended_by_search=self.ended_by_search))


def _json_lines(path: Path) -> list[Any]:
    """The JSON values of a file's lines, skipping a line a killed driver cut short."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _read_trial(d: Path, ends: dict[str, str]) -> TrialRecord:
    try:
        config = json.loads((d / "params.json").read_text())
    except (OSError, json.JSONDecodeError):  # missing, or written half by a killed driver
        config = {}
    results = _json_lines(d / "result.json")
    named = d.name.removeprefix("trial_")  # search/run.py names a trial's folder trial_ID
    rec = TrialRecord(str(results[-1].get("trial_id", named)) if results else named, d,
                      config if isinstance(config, dict) else {}, results)
    err = d / "error.txt"
    if err.exists():
        lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
        rec.error = lines[-1][:200] if lines else "error"
    rec.ended_by_search = ends.get(rec.trial_id, ends.get(named, ""))
    return rec


def load_trials(exp_dir: Path) -> list[TrialRecord]:
    """Every trial folder of the experiment: those with a params.json, and `trial_*` folders Tune
    made for a trial that died before writing one (config {}: status not started or errored)."""
    exp_dir = Path(exp_dir)
    ends = read_ends(exp_dir)
    folders = sorted({p.parent for p in exp_dir.glob("*/params.json")} | set(exp_dir.glob("trial_*")))
    return [_read_trial(d, ends) for d in folders if d.is_dir()]


def rank(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Trials with a usable best epoch, best first: full-fidelity ones by val_acc, equal val_acc (one image can be
    0.5 points) by the lower val_loss; then those pruned at a rung or cut short by the budget or Ctrl-C, the same
    way (their val_acc is another fidelity's); then screen trials (a fraction of the data) in the screen's own order
    (analysis.outcome.screen_order), so a search that ended in its screen exports the trial it would have promoted."""
    return sorted((t for t in trials if t.best is not None), key=_rank_key)


def _rank_key(t: TrialRecord) -> tuple:
    if on_a_fraction(t.config):
        def last(key: str) -> Any:
            return next((r[key] for r in reversed(t.results) if key in r), None)
        return (2, *screen_order(t.epochs_run, last("val_cal_loss"), last("val_loss"), t.best[METRIC]))
    return 0 if t.full_fidelity else 1, -t.best[METRIC], finite_loss(t.best.get("val_loss"))


def export_best(exp_dir: Path, trials: list[TrialRecord]) -> dict[str, Any]:
    """Write best_config.yaml and best_config.json; returns what was written."""
    ranked = rank(trials)
    if not ranked:
        raise UserError(f"{exp_dir} holds no trial with a finished epoch: run or resume the search first")
    best, exp_dir = ranked[0], Path(exp_dir)
    out = {
        "trial_id": best.trial_id,
        "best_val_acc": float(best.best[METRIC]),
        "best_epoch": int(best.best["epoch"]),
        "epochs_run": best.epochs_run,
        # analyze.py's defaults are this folder's best_config.yaml and the search's data
        "retrain_command": command("analyze.py", exp_dir),
        "config": {**best.config, "train_fraction": 1.0},  # the retrain uses all of train + val
    }
    with atomic.together() as files:  # one config in two formats: both new or both old
        files.write_text(exp_dir / "best_config.yaml", yaml.safe_dump(out, sort_keys=False))
        files.write_text(exp_dir / "best_config.json", json.dumps(out, indent=2) + "\n")
    return out


def load_yaml(path: Path, what: str, fix: str) -> Any:
    """The YAML (or JSON) document in the file `path`; a file that can't be read, is not UTF-8 text or is not
    valid YAML is a one-line UserError naming `what` and `path`, ending with `fix`."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file: {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or type(e).__name__}; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text (a binary file, or another encoding): {fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{what} {path} is not valid YAML{f' at line {mark.line + 1}' if mark else ''}: {fix}") from None


def read_best_config(path: Path) -> tuple[dict[str, Any], int | None]:
    """(the validated config, its best_epoch) of a best_config.yaml/json; a plain mapping of
    hyper-parameters is a config without a best_epoch. UserError (one line) for anything else."""
    fix = "pass a best_config.yaml (its `config:` mapping, and `best_epoch:` a whole number)"
    data = load_yaml(path, "config", fix)
    if not isinstance(data, dict):
        raise UserError(f"config {path} is not a mapping: {fix}")
    cfg = data.get("config", data)
    if not isinstance(cfg, dict):
        raise UserError(f"config {path}: `config:` is a {type(cfg).__name__}, not a mapping of hyper-parameters: {fix}")
    TrialConfig.from_dict(cfg)
    epoch = data.get("best_epoch") if "config" in data else None
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise UserError(f"config {path}: best_epoch {epoch!r} is not an epoch number (1 or more): {fix}, "
                        f"or drop best_epoch to retrain the whole schedule")
    return cfg, epoch


def write_settings(exp_dir: Path, settings: dict[str, Any]) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(exp_dir / SETTINGS_FILE, yaml.safe_dump(settings, sort_keys=False))


def read_settings(exp_dir: Path) -> dict[str, Any]:
    """The experiment's search_settings.yaml ({} when it has none); UserError for a damaged one."""
    p = Path(exp_dir) / SETTINGS_FILE
    if not p.exists():
        return {}
    fix = "restore the file from a backup, or start a new search (run_search.py --name NEW)"
    data = load_yaml(p, "the experiment's settings", fix) or {}
    if not isinstance(data, dict):
        raise UserError(f"the experiment's settings {p} are not a mapping: {fix}")
    return data


# the parameters that matter, as the console, the text leaderboard and the report show them
PARAM_COLUMNS = ["backbone", "stages", "unfreeze_depth", "input_size", "batch_size", "aug_strength",
                 "stage1_lr", "stage2_lr", "stage3_lr"]
# their headings: the aug column shows an explicit augment list where one overrides aug_strength
PARAM_HEADS = ["aug" if k == "aug_strength" else k for k in PARAM_COLUMNS]


def duration(s: float) -> str:
    """Seconds as the console shows a wall time: 45s, 3m05s, 1h02m."""
    s = int(round(s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def fmt(v: Any) -> str:
    """A metric for a table cell: 4 decimals for a fraction (an accuracy), else 3 significant digits."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if 0 <= v <= 1 else f"{v:.3g}"
    return str(v)


def fmt_lr(v: float) -> str:
    """A learning rate in one format, whatever its size: 1e-3, 2.5e-4, 3e-2 (3 significant digits)."""
    if v == 0:
        return "0"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def param_cell(config: dict[str, Any], key: str) -> str:
    """One hyper-parameter for a table cell: learning rates by fmt_lr; under aug_strength the explicit
    augment list when one overrides it; "-" for stage 3's lr in a 2-stage plan; other floats to 3 digits."""
    v = config.get(key)
    if key == "aug_strength" and config.get("augment"):
        return str(config["augment"])
    if key == "stages":  # the plan's shape, from its stage epochs
        return "3" if config.get("stage3_epochs") else "2"
    if key == "stage3_lr" and not config.get("stage3_epochs"):
        return "-"
    if isinstance(v, float):
        return fmt_lr(v) if key.endswith("lr") else f"{v:.3g}"
    return "" if v is None else str(v)


def param_cells(config: dict[str, Any], columns: list[str] = PARAM_COLUMNS) -> list[str]:
    return [param_cell(config, k) for k in columns]


def text_table(head: list[str], rows: list[list[str]], numeric: Iterable[int] = ()) -> str:
    """Every plain-text table's layout: columns as wide as their widest cell, a dashed rule under the
    header, `numeric` columns right-aligned."""
    numeric = set(numeric)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def leaderboard(trials: list[TrialRecord], top: int = 10) -> str:
    """A plain-text table of the top trials and their key parameters, then the trials without a result."""
    rows = [[str(i), t.trial_id, f"{t.best[METRIC]:.4f}", str(t.best["epoch"]), f"{t.epochs_run}/{t.planned_epochs}",
             t.status, *param_cells(t.config)] for i, t in enumerate(rank(trials)[:top], start=1)]
    lines = [text_table(["#", "trial", "val_acc", "@epoch", "epochs", "status", *PARAM_HEADS], rows)]
    others = [t for t in trials if t.best is None]
    if others:
        lines.append(f"\n{len(others)} trial(s) without a usable result:")
    lines += [f"   {t.trial_id}: {t.status}" + (f" ({t.reason})" if t.reason else "") for t in others]
    return "\n".join(lines)
