"""The final step: retrain one config (up to the epoch the search selected) on train + val, then test it
once. A config that trains on val_loss (early stopping, reduce-on-plateau) makes the decisions its search
trial made, at the same epochs (trainable.trial.Replay); without such a trial (a recipe baseline) it trains
on the search's train split and watches its val split, as in the search."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from trainable import atomic
from trainable.augment import normalisation_of
from trainable.config import TrialConfig
from trainable.data import FinalData
from trainable.errors import UserError
from trainable.loop import Precision, evaluate
from trainable.memory import is_out_of_memory
from trainable.model import create_model
from trainable.trial import Replay, run_trial, to_device

FIX = "in the config (edit a copy of best_config.yaml and pass it with --config)"


def retrain_split(cfg: TrialConfig, data: FinalData, replay: Replay | None = None):
    """(train, val) of the retrain: train + val and no val, unless the config's early stopping or
    reduce-on-plateau reads val_loss and no `replay` makes its decisions: then the search's splits."""
    return data.search_split() if cfg.uses_val and replay is None else (data.train_val, None)


def retrain_and_test(config: dict[str, Any], data: FinalData, out_dir: Path, *,
                     on_epoch: Callable[[dict[str, Any]], None] = lambda m: None,
                     stop_after_epoch: int | None = None, replay: Replay | None = None) -> dict[str, Any]:
    """Writes out_dir/{test_metrics.json, model.pt, test_predictions.pt}; returns the metrics.
    `stop_after_epoch` k cuts the config's own stage plan and lr schedule after global epoch k; `replay`: a
    search trial's plateau cuts and early stops, made again on train + val (used only by a config that has them).
    Running out of memory or diverging is a UserError saying what to lower."""
    cfg = TrialConfig.from_dict(config)
    replay = replay if cfg.uses_val else None
    train, val = retrain_split(cfg, data, replay)
    cut = stop_after_epoch if stop_after_epoch is not None and stop_after_epoch < cfg.total_epochs else None
    t0 = time.perf_counter()
    net, last = run_trial(cfg.to_dict(), train, val, lambda m, _ckpt: on_epoch(m), checkpoint=False,
                          stop_after_epoch=cut, replay=replay)
    if last.get("status", "ok") == "oom":
        raise UserError(f"the retrain ran {last['error']} {FIX}")
    if last.get("status", "ok") != "ok":
        raise UserError(f"the retrain failed: {last['status']} in epoch {last['epoch']}: "
                        f"lower the learning rates {FIX}")
    train_seconds = time.perf_counter() - t0
    ev, mean, std = _test_pass(net, data, cfg)
    metrics = {"test_acc": ev["acc"], "test_top5": ev["top5"], "test_coarse_acc": ev["coarse_acc"],
               "test_loss": ev["loss"], "epochs": int(last["epoch"]), "planned_epochs": cfg.total_epochs,
               "cut_at_epoch": cut,
               "train_seconds": train_seconds, "train_images": len(train), "test_images": len(data.test),
               "watched_val": val is not None,
               "replayed": {"lr_cuts": sorted(replay.lr_cuts), "early_stops": sorted(replay.early_stops)}
               if replay is not None else None}
    if "coarse_head_acc" in ev:
        metrics.update(test_coarse_head_acc=ev["coarse_head_acc"], test_coarse_head_loss=ev["coarse_head_loss"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.together() as files:  # the three describe one model: all new or all old
        files.torch_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
                          "config": cfg.to_dict(), "fine_names": data.fine_names,
                          "coarse_names": data.coarse_names, "mean": list(mean), "std": list(std)},
                         out_dir / "model.pt")
        files.torch_save({"predictions": ev["predictions"], "labels": torch.from_numpy(data.test.fine.copy()),
                          "coarse_labels": torch.from_numpy(data.test.coarse.copy())},
                         out_dir / "test_predictions.pt")
        files.write_text(out_dir / "test_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


@contextlib.contextmanager
def _out_of_memory_is(message: str):
    """Running out of memory in the block is a UserError with `message`; other errors pass unchanged."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(message) from None


def _test_pass(net: torch.nn.Module, data: FinalData, cfg: TrialConfig) -> tuple[dict[str, Any], tuple, tuple]:
    """(evaluate's results with predictions, mean, std) on the test set, where (and as) the retrain trained."""
    device = next(net.parameters()).device
    mean, std = normalisation_of(net.backbone)
    with _out_of_memory_is(f"the test pass ran out of memory on {device.type} copying the {len(data.test)} test "
                           f"images there: free memory on the device and run it again"):
        test = to_device(data.test, device)
    with _out_of_memory_is(f"the test pass ran out of memory on {device.type} even one image at a time "
                           f"(input_size {cfg.input_size}): lower input_size {FIX}"):
        ev = evaluate(net, *test, input_size=cfg.input_size, mean=mean, std=std, batch_size=cfg.eval_batch_size,
                      prec=Precision.for_device(device, cfg.backbone, cfg.precision), return_predictions=True)
    return ev, mean, std


def load_trained(path: Path):
    """(net on the CPU, checkpoint dict) from a model.pt written above; no pretrained download needed."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TrialConfig.from_dict(ckpt["config"])
    net = create_model(cfg.backbone, pretrained=False, head=cfg.head, small_input_stem=cfg.small_input_stem)
    net.load_state_dict(ckpt["state_dict"])
    # the same memory layout as training used: the faster one on this device (loop.Precision)
    Precision.for_device(torch.device("cpu"), cfg.backbone).model_to(net)
    return net.eval(), ckpt
