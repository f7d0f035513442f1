"""The search, end to end: validate, load the data once, run the Tuner, export the best config."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from search.export import export_best, leaderboard, load_trials, read_settings, write_settings
from search.resources import Resources, plan_resources, start_ray, visible_gpus
from search.searcher import METRIC, MODE, make_scheduler, make_searcher
from search.settings import SearchSettings
from spaces import NAMES, Options, Space, get_space
from trainable.data import SearchData, prepare_search_data
from trainable.errors import UserError


def resolve_space(s: SearchSettings, res: Resources) -> tuple[Space, Options]:
    """The space and the user's narrowing of it, checked against each other."""
    name = s.space
    if name is None:
        name = "default" if visible_gpus() > 0 or s.address else "tiny"
        if name == "tiny":
            print("no GPU: using the CPU-sized 'tiny' space (pass --space default to override)")
    space = get_space(name)
    backbones = tuple(b.strip() for b in s.backbones.split(",") if b.strip()) or space.backbones
    unknown = [b for b in backbones if b not in space.backbones]
    if unknown:
        raise UserError(f"--backbones {','.join(unknown)} not in space {space.name!r}: "
                        f"choose from {','.join(space.backbones)}")
    max_epochs = space.max_epochs if s.max_epochs is None or space.recipe else s.max_epochs
    if s.max_epochs is not None and s.max_epochs < space.min_epochs:
        raise UserError(f"--max-epochs {s.max_epochs} is fewer than space {space.name!r} needs "
                        f"({space.min_epochs}: one epoch per stage at least): raise it")
    return space, Options(backbones=backbones, max_epochs=max_epochs)


def validate(s: SearchSettings) -> None:
    if s.num_samples < 1:
        raise UserError(f"--num-samples {s.num_samples} must be >= 1")
    if s.grace_period < 1 or s.reduction_factor < 2:
        raise UserError("--grace-period must be >= 1 and --reduction-factor >= 2")
    if s.scheduler not in ("asha", "fifo"):
        raise UserError(f"--scheduler {s.scheduler!r} is not asha or fifo")
    if s.max_failures < 0:
        raise UserError("--max-failures must be >= 0")


def experiment_dir(s: SearchSettings, space: Space) -> Path:
    storage = Path(s.storage_path).expanduser().resolve()
    if s.resume and not s.name:
        raise UserError("--resume needs --name of the experiment to continue")
    name = s.name or f"{space.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    exp = storage / name
    if s.resume:
        from ray import tune
        if not tune.Tuner.can_restore(str(exp)):
            raise UserError(f"--resume: no experiment at {exp}: check --name and --storage-path")
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--storage-path {storage} is not writable ({e.strerror}): pick another folder") from None
    return exp


def check_backbones(opts: Options, fixed: dict[str, Any], base: dict[str, Any]) -> None:
    """Unknown backbones, and pretrained weights that can't be had, fail before Ray starts."""
    import timm

    from trainable.model import create_model
    names = [fixed["backbone"]] if "backbone" in fixed else list(opts.backbones)
    for b in names:
        if not timm.is_model(b):
            raise UserError(f"unknown backbone {b!r}: use a timm model name (see timm.list_models())")
    if base["pretrained"]:
        for b in names:  # also fills the hub cache once, instead of once per trial
            create_model(b, pretrained=True, weights_dir=base["weights_dir"])


def run_search(s: SearchSettings) -> Path:
    """Run (or resume) a search; returns the experiment folder."""
    validate(s)
    res = plan_resources(s)
    space, opts = resolve_space(s, res)
    fixed = s.fixed_params()
    exp = experiment_dir(s, space)
    if s.resume:  # the experiment's own settings decide the data and the space
        saved = read_settings(exp)
        s = SearchSettings(**{**saved, "resume": True, "address": s.address, "config": ""})
        space, opts = resolve_space(s, res)
        fixed = s.fixed_params()
    data_dir = str(Path(s.data_dir).expanduser().resolve())
    weights_dir = str(Path(s.weights_dir).expanduser().resolve()) if s.weights_dir else ""
    base = {"pretrained": not s.no_pretrained, "weights_dir": weights_dir, "seed": s.seed,
            "compile": s.compile}
    from trainable.config import coerce
    coerce(fixed)  # unknown --set keys and values of the wrong type fail here, before anything starts
    data = prepare_search_data(data_dir, subset=s.subset, val_fraction=s.val_fraction, seed=s.seed)
    if len(data.val) == 0:
        raise UserError("the validation split is empty: raise --val-fraction or --subset")
    check_backbones(opts, fixed, base)
    if not s.resume:
        write_settings(exp, {**s.to_dict(), "space": space.name, "data_dir": data_dir,
                             "weights_dir": weights_dir, "name": exp.name,
                             "storage_path": str(exp.parent)})
    # Tune warns every few seconds that syncing experiment state is slow; it is local and fine
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray(s, res)
    try:
        tuner = build_tuner(s, res, space, opts, fixed, base, data, exp)
        del data  # the object store holds it now; the driver's heap copy would only cost memory
        print(f"experiment: {exp}\nTensorBoard: tensorboard --logdir {exp}", flush=True)
        tuner.fit()
    finally:
        import ray
        ray.shutdown()
    trials = load_trials(exp)
    best = export_best(exp, trials)
    print(leaderboard(trials))
    print(f"\nbest: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} at epoch "
          f"{best['best_epoch']}\nwrote {exp / 'best_config.yaml'}\nretrain and test it: "
          f"{best['retrain_command']}")
    return exp


def build_tuner(s: SearchSettings, res: Resources, space: Space, opts: Options,
                fixed: dict[str, Any], base: dict[str, Any], data: SearchData, exp: Path):
    from ray import tune

    from search.progress import console
    from search.tensorboard import EpochTensorBoard
    from search.trainable import tune_trial

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, train=data.train, val=data.val), res.trial)
    if s.resume:
        return tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    cons = console()
    run_config = tune.RunConfig(
        name=exp.name, storage_path=str(exp.parent),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1,  # the best; Tune also keeps the latest
                                                checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        callbacks=[EpochTensorBoard(), *cons.callbacks], verbose=cons.verbose,
        progress_reporter=cons.progress_reporter)
    tune_config = tune.TuneConfig(
        search_alg=make_searcher(space, opts, fixed, base, s.seed),
        scheduler=make_scheduler(s.scheduler, opts.max_epochs, s.grace_period, s.reduction_factor),
        num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent or None,
        trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default packs every parameter into the name)."""
    return f"trial_{trial.trial_id}"


def list_spaces() -> str:
    return "\n".join(f"{n:28s} {get_space(n).description}" for n in NAMES)
