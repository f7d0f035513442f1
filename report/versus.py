"""The section a user reads first: the search's winner against the best recipe point it started from,
and the incumbent's val_acc against wall time with that recipe's value marked."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.experiment import TrialRecord, rank
from analysis.study import METRIC, MOVE_ATTR, TRIAL_ATTR, by_trial_id, load_study
from report import html as h
from report.plots import figure, save
from trainable.config import RUN_FIELDS


def _hp(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RUN_FIELDS}


def origins(exp: Path, trials: list[TrialRecord]) -> dict[str, str]:
    """{trial_id: where its config came from}: "recipe NAME", "move of <origin>: names", or absent
    (a model proposal, or no study to read)."""
    try:
        study = load_study(exp)
    except Exception:  # noqa: BLE001 - a study this code can't read: no origins
        return {}
    if study is None:
        return {}
    by_number = {t.number: t for t in study.trials}

    def origin(ot, depth: int = 0) -> str:
        if "warm_start" in ot.user_attrs:  # a recipe point, or a trial told from --warm-start DIR
            run_here = TRIAL_ATTR in ot.user_attrs
            return f"{'recipe' if run_here else 'an earlier search trial'} {ot.user_attrs['warm_start']}"
        m = ot.system_attrs.get(MOVE_ATTR)
        if m and depth < 50 and m.get("parent") in by_number:
            return f"{origin(by_number[m['parent']], depth + 1)} + {', '.join(m.get('changed', []))}"
        return "a model proposal"

    by_id = by_trial_id(study.trials)
    return {t.trial_id: origin(by_id[t.trial_id]) for t in trials if t.trial_id in by_id}


def best_recipe(trials: list[TrialRecord], where: dict[str, str]) -> TrialRecord | None:
    """The best full-fidelity trial that ran a recipe point unchanged."""
    recipes = [t for t in rank(trials) if where.get(t.trial_id, "").startswith("recipe ")
               and " + " not in where[t.trial_id] and t.full_fidelity]
    return recipes[0] if recipes else None


def section(exp: Path, trials: list[TrialRecord], out: Path) -> str:
    title = "The winner against the best recipe"
    ranked = rank(trials)
    where = origins(exp, trials)
    rec = best_recipe(trials, where)
    if not ranked or rec is None:
        return h.section(title, h.note("No recipe point ran to the end at full fidelity in this search "
                                       "(--warm-start none, or the budget ended first): nothing to compare with."))
    win = ranked[0]
    gain = win.best[METRIC] - rec.best[METRIC]
    if win.trial_id == rec.trial_id:
        text = (f"The best config is the recipe point {where[rec.trial_id].removeprefix('recipe ')} itself "
                f"(val_acc {rec.best[METRIC]:.1%}): the search found nothing better within its budget.")
    else:
        changed = {k: (rec.config.get(k), v) for k, v in _hp(win.config).items() if rec.config.get(k) != v}
        text = (f"The winner ({where.get(win.trial_id, 'a model proposal')}) reached val_acc "
                f"{win.best[METRIC]:.1%}, {100 * gain:+.1f} points against the best recipe point, "
                f"{where[rec.trial_id].removeprefix('recipe ')} ({rec.best[METRIC]:.1%}). What differs: "
                + (", ".join(f"{k} {a} → {b}" for k, (a, b) in sorted(changed.items())) or "nothing")
                + ".")
    png = plot_incumbent(trials, rec.best[METRIC], out / "incumbent.png")
    return h.section(title, h.note(text), *([h.img(png, "incumbent val_acc against wall time")] if png else []),
                     h.note("val_acc on the validation split; the dotted line is the best recipe point's. "
                            "Only full-fidelity trials count (screen trials train on a fraction of the data)."))


def plot_incumbent(trials: list[TrialRecord], recipe_value: float, path: Path) -> Path | None:
    """The best full-fidelity val_acc so far against seconds since the first result."""
    rows = sorted((r["timestamp"], r[METRIC]) for t in trials for r in t.results
                  if t.full_fidelity and r.get("status", "ok") == "ok"
                  and isinstance(r.get(METRIC), float) and "timestamp" in r)
    if not rows:
        return None
    t0, best, xs, ys = rows[0][0], -1.0, [], []
    for ts, v in rows:
        if v > best:
            best = v
            xs.append(ts - t0)
            ys.append(100 * v)
    fig, ax = figure(6, 3.2)
    ax.step(xs + [rows[-1][0] - t0], ys + ys[-1:], where="post", label="the search's best so far")
    ax.axhline(100 * recipe_value, color="grey", ls=":", label="best recipe point")
    ax.set_xlabel("seconds since the first result")
    ax.set_ylabel("val_acc, %")
    ax.legend(fontsize=8)
    return save(fig, path)
