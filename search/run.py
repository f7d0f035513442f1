"""The search, end to end: resolve the settings, check every config before Ray starts, load the data
once, run the Tuner, export the best config."""
from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import timm
import torch
from ray import tune

from analysis.command import command
from analysis.experiment import export_best, leaderboard, load_trials, read_settings, write_settings
from analysis.outcome import INTERRUPTED, read_ends
from analysis.study import METRIC, MODE, resume_study_at
from analysis.study_end import search_over, settle_study
from search import estimate, plan
from search.budget import BudgetStopper, exhausted
from search.precheck import check_warm_points, plan_search
from search.progress import SearchLog, quiet_ray_console
from search.resources import Resources, plan_resources, start_ray, visible_gpus
from search.restore import restore_tuner
from search.searcher import make_scheduler, make_searcher, stage_aware_grace, told_trials
from search.settings import SearchSettings, check_settings
from search.storage import Place, claim, open_experiment, parent_and_name
from search.tensorboard import EpochTensorBoard
from search.tune_trial import tune_trial
from spaces import LISTED, Options, Space, get_space
from spaces.warm_start import recipe_points
from trainable.data import SearchData, prepare_search_data
from trainable.errors import UserError
from trainable.model import create_model

DEFAULT_SAMPLES = 16


@dataclass
class Search:
    """One search, resolved once: its settings, resources, where it is stored and the space it samples."""
    s: SearchSettings
    res: Resources
    place: Place
    space: Space
    opts: Options
    fixed: dict[str, Any]  # the --set values, typed
    base: dict[str, Any]  # the search-wide run fields every trial gets

    @property
    def exp(self) -> Path:
        return self.place.exp


def run_search(s: SearchSettings) -> Path:
    """Run (or resume) a search; returns the experiment folder."""
    job = resolve(s)
    data = prepare_search_data(job.s.data_dir, subset=job.s.subset, val_fraction=job.s.val_fraction, seed=job.s.seed)
    if len(data.val) == 0:
        raise UserError("the validation split is empty: raise --val-fraction or --subset")
    check_backbones(job.opts, job.fixed, job.base)
    points, told = warm_start(job.s, job.space, job.opts, job.fixed, job.base) if not job.s.resume else ([], [])
    check_warm_points(points, job.opts.max_epochs)
    est = cost_estimate(job, points, data)
    budget_plan = make_plan(job.s, est)
    if budget_plan is not None:
        print(budget_plan.describe(), flush=True)
    if job.s.estimate:
        return job.exp
    lock = claim(job.exp)  # noqa: F841 - held until this search returns
    if not job.s.resume:
        write_settings(job.exp, {**job.s.to_dict(), "space": job.space.name, "name": job.exp.name, **job.place.settings()})
        if est is not None:
            estimate.save(job.exp, est)
        if budget_plan is not None:
            plan.save(job.exp, budget_plan)
    job.place.upload()
    # Tune warns every few seconds that syncing experiment state is slow; it is local and fine
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray(job.s, job.res)
    try:
        tuner = build_tuner(job, data, points, told, est, budget_plan)
        del data  # the object store holds it now; the driver's heap copy would only cost memory
        print(job.place.describe(), flush=True)
        tuner.fit()
    except BaseException:
        job.place.upload(best_effort=True)  # Ctrl-C, a crash: what the driver has is kept for --resume
        raise
    finally:
        ray.shutdown()
    finish(job)
    return job.exp


def resolve(s: SearchSettings) -> Search:
    """The settings checked and resolved (a resumed search's own saved settings decide the data and
    the space), the experiment opened, and every config the search can give a trial checked."""
    check_settings(s)
    res = plan_resources(s)
    if s.resume:
        place = open_experiment(s.storage_path, s.name, "", True, s.local_dir)
        # where the experiment is now, not where it was saved (a folder can be moved)
        s = SearchSettings(**{**read_settings(place.exp), "resume": True, "address": s.address, "config": "",
                              "storage_path": s.storage_path})
        resume_study_at(place.exp)
        if s.time_budget and exhausted(place.exp):
            raise UserError(f"--resume: {place.exp.name} has spent its --time-budget of {s.time_budget}: nothing "
                            f"is left to run; see its results with {command('analyze.py', place.exp, '--no-retrain')}")
        space, opts = resolve_space(s)
    else:
        space, opts = resolve_space(s)
        place = open_experiment(s.storage_path, s.name, f"{space.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
                                False, s.local_dir)
    s = dataclasses.replace(s, data_dir=str(Path(s.data_dir).expanduser().resolve()),
                            weights_dir=str(Path(s.weights_dir).expanduser().resolve()) if s.weights_dir else "")
    fixed, base = s.fixed(), s.trial_base()
    checked = plan_search(s, space, opts, fixed, base)  # every config a trial can get, checked before Ray
    if checked.note:
        print(checked.note)
    s = dataclasses.replace(s, num_samples=checked.num_samples)
    return Search(s, res, place, checked.space, checked.opts, fixed, base)


def resolve_space(s: SearchSettings) -> tuple[Space, Options]:
    """The space and the user's narrowing of it, checked against each other."""
    name = s.space
    if name is None:
        name = "default" if visible_gpus() > 0 or s.address else "cpu"
        if name == "cpu":
            print("no GPU: using the CPU-sized 'cpu' space (pass --space default to override)")
    if s.gpus and not s.address and visible_gpus() == 0:
        print(f"warning: --gpus {s.gpus} but torch sees no CUDA GPU here: Ray gets {s.gpus} logical GPUs "
              f"and every trial trains on the CPU (pass --gpus 0, or run where the GPUs are)")
    space = get_space(name)
    backbones = tuple(b.strip() for b in s.backbones.split(",") if b.strip()) or space.backbones
    unknown = [b for b in backbones if b not in space.backbones]
    if unknown:
        raise UserError(f"--backbones {','.join(unknown)} not in space {space.name!r}: "
                        f"choose from {','.join(space.backbones)}")
    if s.max_epochs is not None and s.max_epochs < space.min_epochs and not space.recipe:  # recipes: precheck
        raise UserError(f"--max-epochs {s.max_epochs} is fewer than space {space.name!r} needs "
                        f"({space.min_epochs}: one epoch per stage at least): raise it")
    return space, Options(backbones, space.max_epochs if s.max_epochs is None or space.recipe else s.max_epochs)


def num_samples(s: SearchSettings) -> int:
    """--num-samples; with a time budget and none given, until the budget is spent (-1, Tune's "no
    limit"); else 16."""
    if s.num_samples is not None:
        return s.num_samples
    return -1 if s.time_budget else DEFAULT_SAMPLES


def warm_start(s: SearchSettings, space: Space, opts: Options, fixed: dict[str, Any],
               base: dict[str, Any]) -> tuple[list, list]:
    """(recipe points to enqueue, earlier experiments' trials to tell the searcher) from
    --warm-start recipes|none|DIR[,DIR...] (items may be combined: recipes,runs/old)."""
    whole = Path(s.warm_start).expanduser()  # one folder whose name holds a comma
    items = [s.warm_start] if "," in s.warm_start and whole.is_dir() else \
        [i.strip() for i in s.warm_start.split(",") if i.strip()] or ["none"]
    if "none" in items and len(items) > 1:
        raise UserError(f"--warm-start {s.warm_start!r}: 'none' cannot be combined with other items")
    points, dirs = [], []
    for item in items:
        if item == "recipes" and not space.recipe:  # a recipe run is its own warm start
            points, skipped = recipe_points(space, opts, base, fixed)
            print(f"warm start: {len(points)} recipe point(s) run first"
                  + (f"; {len(skipped)} recipe(s) are not points of this space" if skipped else ""))
            for line in skipped:
                print(f"  not a point of the space: {line}")
        elif item not in ("recipes", "none"):
            d = Path(item).expanduser().resolve()
            if not (d.is_dir() and any(d.glob("*/params.json"))):
                raise UserError(f"--warm-start {item}: not an experiment folder with trials "
                                f"(pass runs/NAME, 'recipes' or 'none')")
            dirs.append(d)
    told = []
    if dirs:
        told, skipped = told_trials(dirs, space, opts, fixed)
        print(f"warm start: the searcher is told {len(told)} finished trial(s) of "
              f"{', '.join(d.name for d in dirs)}" + (f" ({len(skipped)} not points of this space)" if skipped else ""))
    return points, told


def check_backbones(opts: Options, fixed: dict[str, Any], base: dict[str, Any]) -> None:
    """Unknown backbones, and pretrained weights that can't be had, fail before Ray starts."""
    names = [fixed["backbone"]] if "backbone" in fixed else list(opts.backbones)
    for b in names:
        if not timm.is_model(b):
            raise UserError(f"unknown backbone {b!r}: use a timm model name (see timm.list_models())")
    if base["pretrained"]:
        for b in names:  # also fills the hub cache once, instead of once per trial
            create_model(b, pretrained=True, weights_dir=base["weights_dir"])


def grace_period(job: Search) -> int:
    """--grace-period, or the stage-aware default (search/searcher.py)."""
    return job.s.grace_period if job.s.grace_period is not None else stage_aware_grace(job.space, job.opts.max_epochs)


def build_tuner(job: Search, data: SearchData, points: list, told: list, est, budget_plan) -> tune.Tuner:
    s, exp = job.s, job.exp
    trainable = tune.with_resources(tune.with_parameters(tune_trial, train=data.train, val=data.val), job.res.trial)
    stop = BudgetStopper(exp, s.budget_s()) if s.time_budget else None
    prior = est.trial_asha_s + est.startup_s if est is not None else None
    callbacks = [EpochTensorBoard(exp=exp), SearchLog(exp, prior_trial_s=prior, budget=stop, sync=job.place.sync)]
    quiet_ray_console()  # Ray's own console says what contradicts ours
    if s.resume:  # with ASHA's rungs rebuilt and --max-concurrent holding for restored trials
        return restore_tuner(job.place.tune_path, trainable, s.max_concurrent, callbacks, stop)
    storage_path, name = parent_and_name(job.place.tune_path)
    run_config = tune.RunConfig(
        stop=stop, name=name, storage_path=storage_path, callbacks=callbacks, verbose=0, progress_reporter=None,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1,  # the best; Tune also keeps the latest
                                                checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=s.max_failures))
    tune_config = tune.TuneConfig(
        search_alg=make_searcher(job.space, job.opts, job.fixed, job.base, s.seed, exp, points, told, s.sampler,
                                 screen_fraction=budget_plan.screen_fraction if budget_plan else 1.0,
                                 promote=budget_plan.promote if budget_plan else 0),
        scheduler=make_scheduler(s.scheduler, job.opts.max_epochs, grace_period(job), s.reduction_factor),
        num_samples=num_samples(s), max_concurrent_trials=s.max_concurrent or None,
        trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def finish(job: Search) -> None:
    """Settle the study, export the best config and print the leaderboard and what to do next."""
    job.place.fetch_results()
    trials = load_trials(job.exp)
    spent = exhausted(job.exp)  # the study told how each trial ended, before the upload below
    settle_study(job.exp, search_over(trials, num_samples(job.s), spent),
                 "the time budget ran out" if spent else "the search ended")
    if INTERRUPTED in read_ends(job.exp).values():
        print(f"interrupted: continue it with {job.place.resume_command()}")
    best = export_best(job.exp, trials)
    job.place.upload()
    print(leaderboard(trials))
    print(f"\nbest: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} at epoch "
          f"{best['best_epoch']}\nwrote {job.exp / 'best_config.yaml'}\nretrain and test it: "
          f"{best['retrain_command']}")
    if job.place.closing():
        print(job.place.closing())


def parallel_trials(s: SearchSettings, res: Resources) -> int:
    """How many trials run at once on the local resources (and --max-concurrent)."""
    n = int(res.cpus // res.trial["cpu"])  # Ray schedules on CPUs and GPUs alike
    if res.trial["gpu"] > 0:
        n = min(n, int(res.gpus / res.trial["gpu"] + 1e-9))
    return max(1, min(n, s.max_concurrent) if s.max_concurrent else n)


def cost_estimate(job: Search, points: list, data: SearchData):
    """Measure (or read from the cache) and print what the search will cost; None on --resume."""
    s, res = job.s, job.res
    if s.resume:
        return None
    device = torch.device("cuda:0" if res.gpus > 0 and torch.cuda.is_available() else "cpu")
    rungs = estimate.asha_rungs(grace_period(job), s.reduction_factor, job.opts.max_epochs) if s.scheduler == "asha" else []
    n = num_samples(s)
    est = estimate.estimate(job.space, job.opts, job.fixed, job.base, points, n_train=len(data.train),
                            n_val=len(data.val), device=device, threads=int(res.trial["cpu"]),
                            parallel=parallel_trials(s, res), num_samples=n if n > 0 else None,
                            budget_s=s.budget_s(),
                            rungs=rungs, rf=s.reduction_factor, seed=s.seed)
    print(estimate.describe(est), flush=True)
    return est


def make_plan(s: SearchSettings, est) -> plan.BudgetPlan | None:
    """The budget plan from the cost estimate; None on --resume (the saved searcher goes on with the
    plan it began) or when every trial is the searcher's own."""
    if est is None or not est.n_warm:
        return None
    trial_s = est.trial_asha_s if s.scheduler == "asha" else est.trial_fifo_s
    return plan.plan_budget(est.warm_train_s, est.warm_val_s, startup_s=est.startup_s, parallel=est.parallel,
                            own_trial_s=trial_s + est.startup_s,
                            budget_s=s.budget_s(),
                            num_samples=s.num_samples, screen=s.screen)


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default packs every parameter into the name)."""
    return f"trial_{trial.trial_id}"


def list_spaces() -> str:
    return "\n".join(f"{n:28s} {get_space(n).description}" for n in LISTED)
