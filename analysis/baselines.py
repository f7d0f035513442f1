"""Hand-made recipes (spaces/: fixed TrialConfigs) beside the search's best: each retrained on the
same data by the same trial code and tested once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from analysis.final import retrain_and_test
from spaces import RECIPES, recipe_config, scale_epochs
from trainable import atomic
from trainable.config import TrialConfig, coerce, split_assignment
from trainable.data import FinalData
from trainable.errors import UserError
from trainable.model import check_weights

COMPARISON = "comparison.json"


def parse_overrides(items: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """`[RECIPE:]KEY=VALUE` items -> {recipe: {key: value}}; an unscoped item applies to all."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items:
        key, value = split_assignment(item, "[RECIPE:]KEY=VALUE")
        scope, _, key = key.rpartition(":")
        if not key:
            raise UserError(f"--set {item!r} is not [RECIPE:]KEY=VALUE: write e.g. --set pretrained=false")
        if scope and scope not in out:
            raise UserError(f"--set {item!r}: {scope} is not one of --baselines ({', '.join(names)})")
        for n in ([scope] if scope else names):
            out[n].update(coerce({key: value.strip()}))
    return out


def baseline_configs(names: list[str], overrides: list[str], base: dict[str, Any],
                     epochs_scale: float) -> dict[str, dict[str, Any]]:
    """Each recipe's complete config, checked (names, values, weights) before anything trains."""
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise UserError(f"--baselines {','.join(unknown) or '(empty)'}: choose recipes from "
                        f"{', '.join(RECIPES)}")
    fixed = parse_overrides(overrides, names)
    configs = {}
    for n in names:
        cfg = recipe_config(n, base=base)
        cfg = scale_epochs(cfg, epochs_scale) if epochs_scale != 1 else cfg
        cfg = TrialConfig.from_dict({**cfg, **fixed[n]}).to_dict()  # --set wins over the scaling
        check_weights(cfg["backbone"], cfg["pretrained"], cfg["weights_dir"])
        configs[n] = cfg
    return configs


def run_baseline(config: dict[str, Any], data: FinalData, out_dir: Path, *,
                 on_epoch: Callable[[dict[str, Any]], None] = lambda m: None) -> dict[str, Any]:
    """Retrain and test one recipe into out_dir; a failure becomes its metrics' error, so the others go on."""
    try:
        metrics = retrain_and_test(config, data, out_dir, on_epoch=on_epoch)
    except UserError as e:
        metrics = {"error": str(e)}
    return {"config": config, "metrics": metrics}


def comparison_rows(best: dict[str, Any] | None, baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table: the search's best first (when it was retrained), then each recipe."""
    rows = []
    if best is not None:
        rows.append(_row(f"search best (trial {best['trial_id']})", best["config"], best["metrics"]))
    rows += [_row(name, r["config"], r["metrics"]) for name, r in baselines.items()]
    return rows


def _row(name: str, cfg: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    return {"recipe": name, "backbone": cfg["backbone"], "pretrained": bool(cfg["pretrained"]),
            "head": cfg["head"], "input_size": cfg["input_size"], "epochs": m.get("epochs"),
            "planned_epochs": TrialConfig.from_dict(cfg).total_epochs, "train_images": m.get("train_images"),
            "train_seconds": m.get("train_seconds"), "test_acc": m.get("test_acc"),
            "test_coarse_acc": m.get("test_coarse_acc"), "error": m.get("error", "")}


def save_comparison(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> Path:
    path = out_dir / COMPARISON
    atomic.write_text(path, json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return path
