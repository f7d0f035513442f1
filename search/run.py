"""The search, end to end: resolve the settings, check every config before Ray starts, load the data
once, estimate the cost and plan the budget, run the Tuner, export the best config."""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from analysis.cloud import parent_and_name
from analysis.command import command
from analysis.experiment import export_best, leaderboard, load_trials, read_settings, write_settings
from analysis.outcome import INTERRUPTED, read_ends
from analysis.study import METRIC, MODE, resume_study_at
from analysis.study_end import search_over, settle_study
from planning import estimate, plan
from planning.define import warm_start
from planning.precheck import plan_search
from planning.settings import SearchSettings
from search.budget import BudgetStopper, exhausted
from search.progress import SearchLog, quiet_ray_console
from search.ray_adapter import memory_killed
from search.resources import Resources, plan_resources, start_ray, visible_gpus
from search.restore import restore_tuner
from search.searcher import make_scheduler, make_searcher, stage_aware_grace
from search.storage import Place, claim, open_experiment
from search.tensorboard import EpochTensorBoard
from search.tune_trial import tune_trial
from spaces import LISTED, Options, Space, get_space, narrow
from trainable.data import SearchData, prepare_search_data, test_split_problem
from trainable.errors import SearchStopped, UserError
from trainable.memory import node_in_use
from trainable.model import create_model
from trainable.trial import SCRATCH_PREFIX

DEFAULT_SAMPLES = 16


@dataclass
class Search:
    """One search, resolved once: its settings, resources, where it is stored and what its trials get."""
    s: SearchSettings
    res: Resources
    place: Place
    space: Space
    opts: Options
    fixed: dict[str, Any]  # the --set values, typed
    base: dict[str, Any]  # the search-wide run fields every trial gets
    num_samples: int  # Tune's: -1 runs until the time budget is spent
    grace_period: int  # ASHA's


def run_search(s: SearchSettings) -> Path:
    """Run (or resume) a search; returns the experiment folder. A --time-budget counts from here."""
    started = time.monotonic()
    job = resolve(s)
    s, exp = job.s, job.place.exp
    data = prepare_search_data(s.data_dir, subset=s.subset, val_fraction=s.val_fraction, seed=s.seed)
    if len(data.val) == 0:
        raise UserError("the validation split is empty: raise --val-fraction or --subset")
    if problem := test_split_problem(s.data_dir):  # the search runs without the test file; the winner's test needs it
        print(f"warning: {problem} (the search runs without it, but analyze.py tests the winner on it)")
    if job.base["pretrained"]:  # weights that can't be had fail before Ray, and the hub cache fills once
        for b in [job.fixed["backbone"]] if "backbone" in job.fixed else job.opts.backbones:
            create_model(b, pretrained=True, weights_dir=job.base["weights_dir"])
    points, told = ([], []) if s.resume else warm_start(s, job.space, job.opts, job.fixed, job.base)
    est, budget_plan = (None, None) if s.resume else estimate_and_plan(job, points, data, started)
    if s.estimate:
        return exp
    setup_s = time.monotonic() - started
    if s.time_budget and not s.resume and setup_s >= s.budget_s():
        raise UserError(f"--time-budget {s.time_budget} was used up by the checks and the cost estimate ({setup_s:.0f} s) "
                        f"before the first trial: give a bigger --time-budget (see the budget plan above)")
    lock = claim(exp)  # noqa: F841 - held until this search returns
    for stale in exp.glob(f"{SCRATCH_PREFIX}*"):  # checkpoints a killed run of it left before Tune copied them
        shutil.rmtree(stale, ignore_errors=True)
    if not s.resume:
        write_settings(exp, {**dataclasses.asdict(s), "space": job.space.name, "name": exp.name, **job.place.settings()})
        estimate.save(exp, est)
        if budget_plan is not None:
            plan.save(exp, budget_plan)
    job.place.upload()
    # Tune warns every few seconds that syncing experiment state is slow; it is local and fine
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray(s, job.res)
    try:
        tuner = build_tuner(job, data, points, told, est, budget_plan, started)
        del data  # the object store holds it now; the driver's heap copy would only cost memory
        print(job.place.describe(), flush=True)
        tuner.fit()
    except BaseException as e:
        job.place.upload(best_effort=True)  # Ctrl-C, a crash: what the driver has is kept for --resume
        if used := memory_killed(e):
            raise SearchStopped(f"Ray's memory monitor killed a trial's worker ({used}): "
                                f"the search stopped, its results kept; free memory (another program, another search), "
                                f"then continue it with {job.place.resume_command()}") from None
        raise
    finally:
        ray.shutdown()
    finish(job)
    return exp


def resolve(s: SearchSettings) -> Search:
    """The settings resolved (a resumed search's own saved settings decide the data and the space), the
    experiment opened, and every config the search can give a trial checked."""
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
    if not s.resume:
        place = open_experiment(s.storage_path, s.name, f"{space.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
                                False, s.local_dir)
    # absolute, links kept: a broken one is named as the user typed it
    s = dataclasses.replace(s, data_dir=os.path.abspath(Path(s.data_dir).expanduser()),
                            weights_dir=str(Path(s.weights_dir).expanduser().resolve()) if s.weights_dir else "")
    fixed, base = s.fixed(), s.trial_base()
    checked = plan_search(s, space, opts, fixed, base)
    if checked.note:
        print(checked.note)
    s = dataclasses.replace(s, num_samples=checked.num_samples)
    num_samples = s.num_samples if s.num_samples is not None else -1 if s.time_budget else DEFAULT_SAMPLES
    grace = s.grace_period if s.grace_period is not None else stage_aware_grace(checked.space, checked.opts.max_epochs)
    return Search(s, res, place, checked.space, checked.opts, fixed, base, num_samples, grace)


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
    return space, narrow(space, s.backbones, s.max_epochs)


def estimate_and_plan(job: Search, points: list, data: SearchData, started: float) -> tuple[estimate.Estimate, plan.BudgetPlan | None]:
    """Print what the search will cost (measured, or from the cache), then the budget plan made from it
    (None when every trial is the searcher's own) for what is left of a --time-budget since `started`."""
    s, res = job.s, job.res
    parallel = int(res.cpus // res.trial["cpu"])  # trials at once: Ray schedules on CPUs and GPUs alike
    if res.trial["gpu"] > 0:
        parallel = min(parallel, int(res.gpus / res.trial["gpu"] + 1e-9))
    if s.max_concurrent:
        parallel = min(parallel, s.max_concurrent)
    est = estimate.estimate(
        job.space, job.opts, job.fixed, job.base, points, n_train=len(data.train), n_val=len(data.val),
        device=torch.device("cuda:0" if res.gpus > 0 and torch.cuda.is_available() else "cpu"),
        threads=int(res.trial["cpu"]), parallel=max(1, parallel), num_samples=job.num_samples if job.num_samples > 0 else None,
        budget_s=s.budget_s(), rf=s.reduction_factor, seed=s.seed,
        rungs=estimate.asha_rungs(job.grace_period, s.reduction_factor, job.opts.max_epochs) if s.scheduler == "asha" else [])
    print(estimate.describe(est), flush=True)
    if not est.n_warm:
        return est, None
    trial_s = est.trial_asha_s if s.scheduler == "asha" else est.trial_fifo_s
    setup_s = time.monotonic() - started
    left = None if s.budget_s() is None else max(0.0, s.budget_s() - setup_s)
    budget_plan = plan.plan_budget(est.warm_train_s, est.warm_val_s, startup_s=est.startup_s, parallel=est.parallel,
                                   own_trial_s=trial_s + est.startup_s, budget_s=left,
                                   num_samples=s.num_samples, screen=s.screen, setup_s=setup_s)
    print(budget_plan.describe(s.sampler), flush=True)
    return est, budget_plan


def build_tuner(job: Search, data: SearchData, points: list, told: list, est, budget_plan, started: float) -> tune.Tuner:
    s, exp = job.s, job.place.exp
    # what the driver, Ray and the OS hold now is off every trial's memory budget (trainable/memory.py)
    trial = tune.with_parameters(tune_trial, train=data.train, val=data.val, in_use=node_in_use(), scratch=str(exp))
    trainable = tune.with_resources(trial, job.res.trial)
    stop = BudgetStopper(exp, s.budget_s(), started=started) if s.time_budget else None
    prior = est.trial_asha_s + est.startup_s if est is not None else None
    callbacks = [EpochTensorBoard(exp=exp), SearchLog(exp, prior_trial_s=prior, budget=stop, sync=job.place.sync)]
    quiet_ray_console()  # Ray's own console says what contradicts ours
    if s.resume:  # with ASHA's rungs rebuilt and --max-concurrent holding for restored trials
        return restore_tuner(job.place, trainable, s.max_concurrent, callbacks, stop)
    storage_path, name = parent_and_name(job.place.tune_path)
    run_config = tune.RunConfig(
        stop=stop, name=name, storage_path=storage_path, callbacks=callbacks, verbose=0, progress_reporter=None,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1,  # the best; Tune also keeps the latest
                                                checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=s.max_failures))
    if budget_plan is not None and budget_plan.order:
        points = [points[i] for i in budget_plan.order]
    searcher = make_searcher(job.space, job.opts, job.fixed, job.base, s.seed, exp, points, told, s.sampler,
                             screen_fraction=budget_plan.fractions() if budget_plan else 1.0,
                             promote=budget_plan.promote if budget_plan else 0)
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=make_scheduler(s.scheduler, job.opts.max_epochs, job.grace_period, s.reduction_factor),
        num_samples=job.num_samples, max_concurrent_trials=s.max_concurrent or None, trial_dirname_creator=trial_dirname,
        reuse_actors=True)  # a finished trial's worker runs the next: no new process, imports or CUDA context
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def finish(job: Search) -> None:
    """Settle the study, export the best config and print the leaderboard and what to do next."""
    exp = job.place.exp
    job.place.fetch_results()
    trials = load_trials(exp)
    spent = exhausted(exp)  # the study told how each trial ended, before the upload below
    settle_study(exp, search_over(trials, job.num_samples, spent), "the time budget ran out" if spent else "the search ended")
    if INTERRUPTED in read_ends(exp).values():
        print(f"interrupted: continue it with {job.place.resume_command()}")
    best = export_best(exp, trials)
    job.place.upload()
    print(leaderboard(trials))
    print(f"\nbest: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} at epoch "
          f"{best['best_epoch']}\nwrote {exp / 'best_config.yaml'}\nretrain and test it: "
          f"{best['retrain_command']}")
    if job.place.closing():
        print(job.place.closing())


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default packs every parameter into the name)."""
    return f"trial_{trial.trial_id}"


def list_spaces() -> str:
    return "\n".join(f"{n:28s} {get_space(n).description}" for n in LISTED)
