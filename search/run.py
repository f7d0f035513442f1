"""The search, end to end: validate, load the data once, run the Tuner, export the best config."""
from __future__ import annotations

import datetime
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from analysis.command import command, shown
from analysis.experiment import (
    export_best,
    leaderboard,
    load_trials,
    read_settings,
    write_settings,
)
from analysis.outcome import INTERRUPTED, read_ends
from analysis.study import METRIC, MODE, resume_study_at
from search.resources import Resources, plan_resources, start_ray, visible_gpus
from search.searcher import make_scheduler, make_searcher
from search.settings import SearchSettings, check_settings
from spaces import LISTED, Options, Space, get_space
from trainable.data import SearchData, prepare_search_data
from trainable.errors import UserError


def resolve_space(s: SearchSettings, res: Resources) -> tuple[Space, Options]:
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
    max_epochs = space.max_epochs if s.max_epochs is None or space.recipe else s.max_epochs
    if s.max_epochs is not None and s.max_epochs < space.min_epochs and not space.recipe:  # recipes: search/precheck.py
        raise UserError(f"--max-epochs {s.max_epochs} is fewer than space {space.name!r} needs "
                        f"({space.min_epochs}: one epoch per stage at least): raise it")
    return space, Options(backbones=backbones, max_epochs=max_epochs)


DEFAULT_SAMPLES = 16


def validate(s: SearchSettings) -> None:
    """Every option's value (search/settings.py check_settings), for settings not built by the CLI."""
    check_settings(s)


def num_samples(s: SearchSettings) -> int:
    """Trials to run: --num-samples; with a time budget and none given, until the budget is spent
    (-1, Tune's "no limit"); else 16."""
    if s.num_samples is not None:
        return s.num_samples
    return -1 if s.time_budget else DEFAULT_SAMPLES


def warm_start(s: SearchSettings, space: Space, opts: Options, fixed: dict[str, Any],
               base: dict[str, Any]) -> tuple[list, list]:
    """(recipe points to enqueue, earlier experiments' trials to tell the searcher) from
    --warm-start recipes|none|DIR[,DIR...] (items may be combined: recipes,runs/old)."""
    from search.searcher import told_trials
    from spaces.warm_start import recipe_points
    whole = Path(s.warm_start).expanduser()  # one folder whose name holds a comma
    items = [s.warm_start] if "," in s.warm_start and whole.is_dir() else \
        [i.strip() for i in s.warm_start.split(",") if i.strip()] or ["none"]
    if "none" in items and len(items) > 1:
        raise UserError(f"--warm-start {s.warm_start!r}: 'none' cannot be combined with other items")
    points, dirs = [], []
    for item in items:
        if item == "recipes":
            if space.recipe:
                continue  # a recipe run is its own warm start
            points, skipped = recipe_points(space, opts, base, fixed)
            print(f"warm start: {len(points)} recipe point(s) run first"
                  + (f"; {len(skipped)} recipe(s) are not points of this space" if skipped else ""))
            for line in skipped:
                print(f"  not a point of the space: {line}")
        elif item != "none":
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


def grace_period(s: SearchSettings, space: Space, opts: Options) -> int:
    """--grace-period, or the stage-aware default (search/searcher.py)."""
    from search.searcher import stage_aware_grace
    return s.grace_period if s.grace_period is not None else stage_aware_grace(space, opts.max_epochs)


def check_budget_left(s: SearchSettings, exp: Path) -> None:
    """A resumed search whose --time-budget is spent has nothing to run: say so before Ray starts."""
    from search.budget import exhausted
    if s.time_budget and exhausted(exp):
        raise UserError(f"--resume: {exp.name} has spent its --time-budget of {s.time_budget}: nothing "
                        f"is left to run; see its results with {command('analyze.py', exp, '--no-retrain')}")


def resume_command(s: SearchSettings, exp: Path) -> str:
    """The command that continues this experiment (--storage-path left out when it is the default)."""
    from search.storage import is_uri
    args: list = ["--resume", "--name", exp.name]
    if is_uri(s.storage_path):
        args += ["--storage-path", s.storage_path]
    elif shown(exp.parent) != "runs":
        args += ["--storage-path", exp.parent]
    return command("run_search.py", *args)


def experiment_dir(s: SearchSettings, space: Space | None) -> Path:
    """The local experiment folder: STORAGE/NAME, or with a cloud --storage-path the driver's local
    copy of URI/NAME (`cloud_experiment`). Without --resume, a --name whose folder holds a search
    that started is refused (never a second search in it); a default name is made unique."""
    from search.storage import is_uri, local_path
    if s.resume and not s.name:
        raise UserError("--resume needs --name of the experiment to continue")
    name = s.name or f"{space.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if is_uri(s.storage_path):
        return cloud_experiment(s, name)
    storage = local_path(s.storage_path)
    exp = storage / name
    if s.resume:
        from ray import tune
        if not tune.Tuner.can_restore(str(exp)):
            raise UserError(f"--resume: no experiment at {exp}: check --name and --storage-path")
    elif not s.name:
        exp = _unused(storage, name)
    elif search_started(exp):
        raise UserError(already_there(name, str(exp)))
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--storage-path {storage} is not writable ({e.strerror}): pick another folder") from None
    return exp


# what a search leaves in its folder once Ray has started it (the settings and estimate come before)
STARTED = ("tuner.pkl", "experiment_state-*.json", "optuna.db", "trial_*")


def search_started(exp: Path) -> bool:
    """Whether the folder holds a search that got as far as starting (a never-started or empty
    folder may be used again)."""
    return exp.is_dir() and any(next(exp.glob(p), None) is not None for p in STARTED)


def already_there(name: str, where: str) -> str:
    """The one line refusing to start a second search in an experiment's folder."""
    return (f"--name {name}: {where} already holds a search: continue it with --resume --name {shlex.quote(name)}, "
            f"or start a new one with a fresh --name")


LOCK_FILE = ".search.lock"


def claim(exp: Path):
    """An exclusive lock on the experiment folder, held while this search runs (released when the
    returned lock is dropped, or the process ends however it ends): a second search on the same
    folder, started at the same time, stops in one line."""
    from filelock import FileLock, Timeout
    exp.mkdir(parents=True, exist_ok=True)
    lock = FileLock(exp / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{exp} is being run by another search right now: wait for it, or start this one "
                        f"with a fresh --name") from None
    return lock


def _unused(storage: Path, name: str) -> Path:
    """STORAGE/NAME, or NAME-2, NAME-3... when another search took the name this second."""
    for i in range(1, 1000):
        exp = storage / (name if i == 1 else f"{name}-{i}")
        if not exp.exists():
            return exp
    raise UserError(f"{storage} holds 999 experiments named {name}*: pass --name")


def cloud_uri(s: SearchSettings, exp: Path) -> str:
    """URI/NAME of a cloud experiment ('' for a local --storage-path)."""
    from search.storage import check_uri, is_uri, join
    return join(check_uri(s.storage_path), exp.name) if is_uri(s.storage_path) else ""


def cloud_experiment(s: SearchSettings, name: str) -> Path:
    """A cloud --storage-path: Ray Tune writes trials to URI/NAME itself; the driver keeps its own
    files (optuna.db, settings, budget, estimate, best_config) in a local folder, uploaded to URI/NAME.
    The URI is reached now, before Ray starts; --resume first fetches the driver's files from it
    (a local copy newer than the URI's is kept)."""
    from analysis.experiment import SETTINGS_FILE
    from search.storage import (
        check_reachable,
        check_uri,
        download,
        join,
        mirror_dir,
        redact,
        top_level_driver_file,
    )
    if any(c in name for c in "?#%"):  # they would change the URI's meaning
        raise UserError(f"--name {name!r}: a cloud experiment's name can't hold ?, # or %: pick another --name")
    uri = join(check_uri(s.storage_path), name)
    check_reachable(uri)
    local = s.local_dir
    if s.resume:
        if not tune_can_restore(uri):
            raise UserError(f"--resume: no experiment at {redact(uri)}: check --name and --storage-path")
        if not local:  # the folder the experiment began in: Ray's saved searcher opens optuna.db there
            import tempfile

            import yaml
            with tempfile.TemporaryDirectory() as tmp:
                download(uri, Path(tmp), skip=lambda rel: rel != SETTINGS_FILE)
                f = Path(tmp) / SETTINGS_FILE
                local = str((yaml.safe_load(f.read_text()) or {}).get("local_dir") or "") if f.exists() else ""
    elif tune_can_restore(uri):
        raise UserError(already_there(name, redact(uri)))
    exp = mirror_dir(uri, local)
    try:
        exp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if s.local_dir or not local:
            raise UserError(f"--local-dir {exp.parent} is not writable ({e.strerror}): pick another folder") from None
        print(f"warning: {exp} (where the experiment began) can't be made here ({e.strerror}); using the cache")
        exp = mirror_dir(uri, "")
        exp.mkdir(parents=True, exist_ok=True)
    if s.resume:
        got = download(uri, exp, skip=top_level_driver_file, newer_only=True)
        print(f"resume: the driver's files of {redact(uri)} are in {exp}"
              + (f" ({len(got)} fetched)" if got else ""))
    return exp


def tune_can_restore(uri: str) -> bool:
    """Whether URI holds a Tune experiment; an unreachable URI is a UserError."""
    from search.storage import storage_error
    try:
        return tune.Tuner.can_restore(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow's OSError, ArrowException
        raise storage_error(uri, e) from None


def save_driver_files(exp: Path, uri: str, best_effort: bool = False) -> None:
    """Upload the driver's files of the local experiment folder to URI/NAME."""
    from search.storage import driver_files, upload
    try:
        upload(driver_files(exp), exp, uri)
    except UserError as e:
        if not best_effort:
            raise
        print(f"warning: could not upload the driver's files: {e}", file=sys.stderr)


class DriverFilesUpload(tune.Callback):
    """Uploads the driver's files (search/storage.py driver_files) of a cloud experiment whenever the
    Optuna study changes (a trial starts or ends: so the bucket's optuna.db is never older than the
    searcher state Tune uploads, and --resume elsewhere finds every trial it knows), every `every_s`
    seconds while results come in (budget.json), and when the experiment ends. Ray Tune's own
    experiment state and the trials' files are synced by Tune itself."""

    def __init__(self, exp: Path, uri: str, every_s: float = 60.0):
        self.exp, self.uri, self.every_s = Path(exp), uri, every_s
        self._last = float("-inf")

    def __setstate__(self, state: dict) -> None:  # restored with the Tuner: another clock
        self.__dict__.update(state)
        self._last = float("-inf")

    def _sync(self, trial=None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        self._refresh_staging(trial)
        save_driver_files(self.exp, self.uri, best_effort=True)

    def _refresh_staging(self, trial) -> None:
        """After a restore Ray has copied the experiment's *.json (budget.json, ...) into its staging
        folder and uploads them with its state; keep those copies current, not the old ones."""
        from search.storage import driver_files
        staging = getattr(getattr(trial, "storage", None), "experiment_driver_staging_path", None)
        if not staging or not Path(staging).is_dir():
            return
        for f in driver_files(self.exp):
            dest = Path(staging) / f.name
            if dest.exists():
                tmp = dest.with_name(f".{dest.name}.tmp")
                shutil.copyfile(f, tmp)
                os.replace(tmp, dest)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._sync(trial, force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._sync(trial)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._sync(trial, force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._sync(trial, force=True)

    def on_experiment_end(self, trials, **info) -> None:
        self._sync(trials[0] if trials else None, force=True)


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
    if s.resume:  # the experiment's own settings decide the data and the space
        exp = experiment_dir(s, None)
        saved = read_settings(exp)
        # where the experiment is now, not where it was saved (a folder can be moved)
        s = SearchSettings(**{**saved, "resume": True, "address": s.address, "config": "",
                              "storage_path": s.storage_path})
        resume_study_at(exp)
        check_budget_left(s, exp)
        space, opts = resolve_space(s, res)
    else:
        space, opts = resolve_space(s, res)
        exp = experiment_dir(s, space)
    fixed = s.fixed_params()
    remote = cloud_uri(s, exp)  # '' for a local --storage-path
    data_dir = str(Path(s.data_dir).expanduser().resolve())
    weights_dir = str(Path(s.weights_dir).expanduser().resolve()) if s.weights_dir else ""
    base = {"pretrained": not s.no_pretrained, "weights_dir": weights_dir, "seed": s.seed,
            "compile": s.compile, "precision": s.precision}
    from dataclasses import replace

    from search.precheck import plan_search
    plan = plan_search(s, space, opts, fixed, base)  # every config a trial can get, checked before Ray
    space, opts, s = plan.space, plan.opts, replace(s, num_samples=plan.num_samples)
    if plan.note:
        print(plan.note)
    data = prepare_search_data(data_dir, subset=s.subset, val_fraction=s.val_fraction, seed=s.seed)
    if len(data.val) == 0:
        raise UserError("the validation split is empty: raise --val-fraction or --subset")
    check_backbones(opts, fixed, base)
    points, told = warm_start(s, space, opts, fixed, base) if not s.resume else ([], [])
    from search.precheck import check_warm_points
    check_warm_points(points, opts.max_epochs)
    est = cost_estimate(s, res, space, opts, fixed, base, points, data)
    budget_plan = make_plan(s, est)
    if budget_plan is not None:
        print(budget_plan.describe(), flush=True)
    if s.estimate:
        return exp
    lock = claim(exp)  # noqa: F841 - held until this search returns
    if not s.resume:
        write_settings(exp, {**s.to_dict(), "space": space.name, "data_dir": data_dir,
                             "weights_dir": weights_dir, "name": exp.name,
                             "storage_path": s.storage_path if remote else str(exp.parent),
                             "local_dir": str(exp.parent) if remote else ""})
        if est is not None:
            from search.estimate import save
            save(exp, est)
        if budget_plan is not None:
            from search import plan
            plan.save(exp, budget_plan)
    if remote:
        save_driver_files(exp, remote)
    # Tune warns every few seconds that syncing experiment state is slow; it is local and fine
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray(s, res)
    try:
        tuner = build_tuner(s, res, space, opts, fixed, base, data, exp, points, told, est, remote, budget_plan)
        del data  # the object store holds it now; the driver's heap copy would only cost memory
        if remote:
            from search.storage import redact
            print(f"experiment: {redact(remote)} (the driver's files: {exp})", flush=True)
        else:
            print(f"experiment: {shown(exp)}\nTensorBoard: {command('tensorboard', '--logdir', exp)}", flush=True)
        from search.progress import quiet_ray_console
        quiet_ray_console()  # a restored Tuner brings its own RunConfig: Ray's console must stay quiet too
        tuner.fit()
    except BaseException:
        if remote:  # Ctrl-C, a crash: what the driver has is in the bucket for --resume
            save_driver_files(exp, remote, best_effort=True)
        raise
    finally:
        import ray
        ray.shutdown()
    if remote:  # the trials' results (not checkpoints) next to the driver's files, for the export
        from search.storage import download, results_only
        download(remote, exp, skip=lambda rel: "/" not in rel or results_only(rel), newer_only=True)
    trials = load_trials(exp)
    from analysis.study_end import search_over, settle_study
    from search.budget import exhausted
    spent = exhausted(exp)  # the study told how each trial ended, before the upload below
    settle_study(exp, search_over(trials, num_samples(s), spent),
                 "the time budget ran out" if spent else "the search ended")
    if INTERRUPTED in read_ends(exp).values():
        print(f"interrupted: continue it with {resume_command(s, exp)}")
    best = export_best(exp, trials)
    if remote:
        save_driver_files(exp, remote)
    print(leaderboard(trials))
    print(f"\nbest: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} at epoch "
          f"{best['best_epoch']}\nwrote {exp / 'best_config.yaml'}\nretrain and test it: "
          f"{best['retrain_command']}")
    if remote:
        from search.storage import redact
        print(f"uploaded to {redact(remote)}; analyze it there (analysis/ goes to the bucket too): "
              f"{command('analyze.py', redact(remote))}")
    return exp


def build_tuner(s: SearchSettings, res: Resources, space: Space, opts: Options,
                fixed: dict[str, Any], base: dict[str, Any], data: SearchData, exp: Path,
                points: list = (), told: list = (), est=None, remote: str = "", budget_plan=None):
    from ray import tune

    from search.outcomes import TrialEnds
    from search.progress import console
    from search.tensorboard import EpochTensorBoard
    from search.tune_trial import tune_trial

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, train=data.train, val=data.val), res.trial)
    if s.resume:  # with ASHA's rungs rebuilt and --max-concurrent holding for restored trials
        from search.restore import restore_tuner
        tuner = restore_tuner(remote or exp, trainable, s.max_concurrent, exp)
        internal = getattr(tuner, "_local_tuner", None)
        if remote and internal is not None:  # the uploader for this folder and URI, not the pickled one
            rc = internal._run_config
            rc.callbacks = [c for c in rc.callbacks or [] if not isinstance(c, DriverFilesUpload)]
            rc.callbacks.append(DriverFilesUpload(exp, remote))
        return tuner
    stop = None
    if s.time_budget:
        from search.budget import BudgetStopper, parse_duration
        stop = BudgetStopper(exp, parse_duration(s.time_budget))
    cons = console(prior_trial_s=est.trial_asha_s + est.startup_s if est is not None else None,
                   budget=stop, exp=exp)
    run_config = tune.RunConfig(
        stop=stop,
        name=exp.name, storage_path=_parent_uri(remote) if remote else str(exp.parent),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1,  # the best; Tune also keeps the latest
                                                checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        callbacks=[EpochTensorBoard(exp=exp), TrialEnds(exp), *cons.callbacks,
                   *([DriverFilesUpload(exp, remote)] if remote else [])], verbose=cons.verbose,
        progress_reporter=cons.progress_reporter)
    tune_config = tune.TuneConfig(
        search_alg=make_searcher(space, opts, fixed, base, s.seed, exp, points, told, s.sampler,
                                 screen_fraction=budget_plan.screen_fraction if budget_plan else 1.0,
                                 promote=budget_plan.promote if budget_plan else 0),
        scheduler=make_scheduler(s.scheduler, opts.max_epochs, grace_period(s, space, opts), s.reduction_factor),
        num_samples=num_samples(s), max_concurrent_trials=s.max_concurrent or None,
        trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _parent_uri(uri: str) -> str:
    """s3://b/runs?opts from s3://b/runs/NAME?opts (Tune's storage_path; the name is the run's)."""
    from search.storage import split_query
    base, query = split_query(uri)
    return base.rsplit("/", 1)[0] + query


def parallel_trials(s: SearchSettings, res: Resources) -> int:
    """How many trials run at once on the local resources (and --max-concurrent)."""
    n = int(res.cpus // res.trial["cpu"])  # Ray schedules on CPUs and GPUs alike
    if res.trial["gpu"] > 0:
        n = min(n, int(res.gpus / res.trial["gpu"] + 1e-9))
    return max(1, min(n, s.max_concurrent) if s.max_concurrent else n)


def cost_estimate(s: SearchSettings, res: Resources, space: Space, opts: Options, fixed: dict[str, Any],
                  base: dict[str, Any], points: list, data: SearchData):
    """Measure (or read from the cache) and print what the search will cost; None on --resume."""
    if s.resume:
        return None
    import torch

    from search.budget import parse_duration
    from search.estimate import asha_rungs, describe, estimate
    device = torch.device("cuda:0" if res.gpus > 0 and torch.cuda.is_available() else "cpu")
    rungs = (asha_rungs(grace_period(s, space, opts), s.reduction_factor, opts.max_epochs)
             if s.scheduler == "asha" else [])
    n = num_samples(s)
    est = estimate(space, opts, fixed, base, points, n_train=len(data.train), n_val=len(data.val),
                   device=device, threads=int(res.trial["cpu"]), parallel=parallel_trials(s, res),
                   num_samples=n if n > 0 else None,
                   budget_s=parse_duration(s.time_budget) if s.time_budget else None,
                   rungs=rungs, rf=s.reduction_factor, seed=s.seed)
    print(describe(est), flush=True)
    return est


def make_plan(s: SearchSettings, est):
    """The budget plan (search/plan.py) from the cost estimate; None on --resume (the saved
    searcher goes on with the plan it began)."""
    if est is None or not est.n_warm:  # nothing to plan: every trial is the searcher's own
        return None
    from search.budget import parse_duration
    from search.plan import plan_budget
    asha = s.scheduler == "asha"
    return plan_budget(est.warm_train_s, est.warm_val_s, startup_s=est.startup_s, parallel=est.parallel,
                       own_trial_s=(est.trial_asha_s if asha else est.trial_fifo_s) + est.startup_s,
                       budget_s=parse_duration(s.time_budget) if s.time_budget else None,
                       num_samples=s.num_samples, screen=s.screen)


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default packs every parameter into the name)."""
    return f"trial_{trial.trial_id}"


def list_spaces() -> str:
    return "\n".join(f"{n:28s} {get_space(n).description}" for n in LISTED)
