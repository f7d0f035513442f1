"""python benchmarks/gpu_check.py [--weights-dir DIR] [--data-dir DIR] (or `make gpu-check`): run first on new GPU hardware.
Per GPU, in the search's precision: a 224 px epoch, its resume, its rate vs the ceiling; two trials per GPU via Ray Tune."""
import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from benchmarks.common import BACKBONE, make_bench, model_fn, per_call, split
from trainable.data import Split
from trainable.loop import Precision
from trainable.trial import CHECKPOINT_FILE, run_trial

NO_GPU = "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights-dir", default="", help="offline weights (<timm name>.pth); '' = the hub")
    p.add_argument("--no-pretrained", action="store_true", help="random init instead of ImageNet weights")
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-100-python/ (random images without it)")
    p.add_argument("--subset", type=int, default=20, help="CIFAR images per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--images", type=int, default=2048, help="random training images (without CIFAR)")
    p.add_argument("--min-ratio", type=float, default=0.5, help="least trial / ceiling throughput that passes")
    p.add_argument("--skip-shared", action="store_true", help="skip the two-trials-per-GPU check (Ray Tune)")
    return p.parse_args(argv)


def data(args) -> tuple[Split, Split]:
    if (Path(args.data_dir) / "cifar-100-python").is_dir():
        d = split(args, args.subset, 0.2)
        return d.train, d.val
    r = np.random.default_rng(0)
    return tuple(Split(r.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8), r.integers(0, 100, k), r.integers(0, 20, k))
                 for k in (args.images, max(args.images // 4, 2)))


def trial_config(args, epochs: int) -> dict:
    return {"backbone": BACKBONE, "pretrained": not args.no_pretrained, "weights_dir": args.weights_dir,
            "input_size": args.input_size, "batch_size": args.batch_size, "eval_batch_size": 256, "stage1_epochs": 0,
            "stage2_epochs": 0, "stage3_epochs": epochs, "stage3_lr": 1e-3, "aug_strength": 0.5, "precision": "auto"}


class Checks:
    def __init__(self) -> None:
        self.failed = self.total = 0

    def run(self, name: str, fn) -> None:
        """fn() returns (ok, detail); an exception is a FAIL with its one-line message."""
        self.total += 1
        try:
            ok, detail = fn()
        except Exception as e:  # every failure is a result here
            ok, detail = False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<18} {detail}", flush=True)


def check_device(dev: torch.device, args, train, val, checks: Checks) -> None:
    """Train, resume and throughput on `dev` (a GPU; the CPU in the tests, at a small size)."""
    tag = f"gpu{dev.index}" if dev.type == "cuda" else "cpu"
    prec, about = Precision.for_device(dev, BACKBONE), "the CPU"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # the ceiling's bench (common.make_bench) and "cuda" alone mean this GPU
        props = torch.cuda.get_device_properties(dev)
        about = f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB"
    print(f"{tag}: {about}: precision {prec.name}{' with a GradScaler' if prec.amp_dtype == torch.float16 else ''}",
          flush=True)
    work, rows = Path(tempfile.mkdtemp(prefix=f"gpu-check-{tag}-")), []

    def keep(m, ckpt):
        rows.append(m)
        if ckpt is not None:
            shutil.copytree(ckpt, work / f"epoch{m['epoch']}", dirs_exist_ok=True)

    def train_epoch():
        _, last = run_trial(trial_config(args, 2), train, val, keep, stop_after_epoch=1, device=dev)
        ok = last.get("status") == "ok" and math.isfinite(last["train_loss"]) and (work / "epoch1" / CHECKPOINT_FILE).is_file()
        return ok, (f"epoch 1, {args.input_size} px, {prec.name}: train_loss {last.get('train_loss', float('nan')):.3f}, "
                    f"val_acc {last.get('val_acc', 0):.3f}, {last.get('images_per_sec', 0):.0f} img/s"
                    + ("" if ok else f", status {last.get('status')} {last.get('error', '')}"))

    def resume():
        before = len(rows)
        _, last = run_trial(trial_config(args, 2), train, val, keep, restore=work / "epoch1", device=dev)
        epochs = [r["epoch"] for r in rows[before:]]
        return last.get("status") == "ok" and epochs == [2], f"from the epoch-1 checkpoint: reported epochs {epochs}"

    def throughput():
        rate = max(r["images_per_sec"] for r in rows if r.get("status") == "ok")
        steps = model_fn(make_bench(train, args.weights_dir), args.input_size, args.batch_size, steps=10)
        ceiling = 10 * args.batch_size / per_call(steps, torch.get_num_threads(), 0.0)  # a warm-up call, then one timed
        return rate >= args.min_ratio * ceiling, (f"trial {rate:.0f} img/s = {rate / ceiling:.0%} of the model-only "
                                                 f"ceiling {ceiling:.0f} img/s (pass: >= {args.min_ratio:.0%})")

    for name, fn in (("train", train_epoch), ("resume", resume), ("throughput", throughput)):
        checks.run(f"{tag} {name}", fn)
    shutil.rmtree(work, ignore_errors=True)


def shared(n_gpus: int, args, train, val) -> tuple[bool, str]:
    """Two trials per GPU at 0.5 GPU each, through Tune and search/tune_trial.tune_trial."""
    import ray  # Ray only here: without a GPU the script ends before it, in seconds
    from ray import tune

    from search.tune_trial import tune_trial
    cpus = os.cpu_count() or 1
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # from any cwd
    ray.init(address="local", num_gpus=n_gpus, num_cpus=cpus, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    storage = tempfile.mkdtemp(prefix="gpu-check-shared-")
    try:
        trainable = tune.with_resources(tune.with_parameters(tune_trial, train=train, val=val),
                                        {"cpu": min(2.0, cpus / (2 * n_gpus)), "gpu": 0.5})
        grid = tune.Tuner(trainable, param_space=trial_config(args, 1), tune_config=tune.TuneConfig(num_samples=2 * n_gpus),
                          run_config=tune.RunConfig(storage_path=storage, name="shared", verbose=0)).fit()
        statuses = [(r.metrics or {}).get("status", f"error: {r.error}") for r in grid]
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return statuses == ["ok"] * (2 * n_gpus), f"{2 * n_gpus} trials at 0.5 GPU each on {n_gpus} GPU(s): {statuses}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    train, val = data(args)
    checks = Checks()
    for i in range(torch.cuda.device_count()):
        check_device(torch.device("cuda", i), args, train, val, checks)
    if not args.skip_shared:
        checks.run("shared gpu (0.5)", lambda: shared(torch.cuda.device_count(), args, train, val))
    print(f"gpu-check: {checks.total - checks.failed} of {checks.total} checks passed", flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
