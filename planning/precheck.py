"""Every config a search can hand a trial, checked before Ray starts. Most mistakes show only in a --set value
combined with what the space samples (an odd batch_size with a sampled mixup_alpha), so the space is sampled
through the searcher's own DefineByRun and each config checked: TrialConfig's validation, the epoch budget
ASHA's max_t assumes, and one forward pass per backbone at the smallest input size it gets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import optuna
import torch

from planning.define import DefineByRun, quiet_optuna
from planning.settings import SearchSettings
from spaces import Options, Space, Suggest
from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.model import create_model

DRAWS = 64  # a two-way branch is missed with probability 2**-64
STAGE_KEYS = ("stage1_epochs", "stage2_epochs", "stage3_epochs")
PROBE_SIZES = (16, 24, 32, 48, 64, 96, 128, 160, 224, 288, 384, 512)


@dataclass(frozen=True)
class Plan:
    """What the search will run, once every config it can produce has been checked."""
    space: Space  # the space, its sample wrapped to vary the seed when a fixed space repeats
    opts: Options  # opts.max_epochs is every trial's total epochs: ASHA's max_t
    num_samples: int | None  # None: the user gave none and the space samples (search/run.py decides)
    configs: list[dict[str, Any]]  # the checked sample of complete configs
    note: str  # one line for the console ("" when there is nothing to say)


class RepeatSeeds:
    """A fixed space's sample function, with seed = first seed + the Optuna trial's number, so
    repeats of one recipe differ only in their seed. A class, not a closure: Tune pickles it."""

    def __init__(self, sample: Callable[[Suggest, Options], dict[str, Any]], first_seed: int):
        self.sample, self.first_seed = sample, first_seed

    def __call__(self, s: Suggest, o: Options) -> dict[str, Any]:
        return {**self.sample(s, o), "seed": self.first_seed + s.trial.number}


def draw(build: Callable[[optuna.Trial], Any], *, draws: int = DRAWS, seed: int = 0) -> tuple[list[Any], bool]:
    """`build(trial)` for `draws` seeded random trials, and whether any trial sampled a value. Random, not the
    searcher's sampler: it visits every branch of a conditional space."""
    quiet_optuna()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out, sampled = [], False
    for _ in range(draws):
        trial = study.ask()
        out.append(build(trial))
        study.tell(trial, 0.0)
        sampled = sampled or bool(trial.params)
        if not sampled:
            break  # nothing sampled: the space's flow is fixed, every draw would be this one
    return out, sampled


def plan_search(s: SearchSettings, space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any]) -> Plan:
    """Sample and check the configs the search will run (`fixed`: the typed --set values); decide
    num_samples and ASHA's max_t. Raises UserError, one line, for any config a trial would fail on."""
    if not space.recipe:
        check_budget(space, opts, fixed)
    configs, sampled = draw(DefineByRun(space, opts, fixed, base))
    if space.recipe:  # its epochs are part of it: ASHA's max_t is its total, and --max-epochs must agree
        total = TrialConfig.from_dict(configs[0]).total_epochs
        if s.max_epochs is not None and s.max_epochs != total:
            raise UserError(f"--max-epochs {s.max_epochs} does not fit recipe {space.name!r}: it trains {total} "
                            f"epochs; drop --max-epochs, or --set its stage epochs (stage1_epochs, ...)")
        opts = dataclasses.replace(opts, max_epochs=total)
    check_models(configs)
    if sampled:
        return Plan(space, opts, s.num_samples, configs, "")
    what = "a fixed recipe" if space.recipe else "--set fixes every parameter it samples"
    head = f"space {space.name!r} has nothing left to sample ({what}): "
    if s.num_samples is None or s.num_samples == 1:
        more = "" if s.num_samples == 1 else f"; --num-samples N runs N repeats with seeds {s.seed}, {s.seed + 1}, ..."
        return Plan(space, opts, 1, configs, f"{head}running it once{more}")
    if "seed" in fixed:
        raise UserError(f"--set seed={fixed['seed']} gives all {s.num_samples} repeats of {space.name!r} "
                        f"one seed: drop it and use --seed N (repeats get N, N+1, ...)")
    seeds = f"{s.seed}..{s.seed + s.num_samples - 1}"
    return Plan(dataclasses.replace(space, sample=RepeatSeeds(space.sample, s.seed)), opts, s.num_samples,
                configs, f"{head}running {s.num_samples} repeats with seeds {seeds}")


def budget_problem(space: Space, opts: Options, fixed: dict[str, Any]) -> str:
    """What is wrong with the stage epochs of the first config the space samples under `fixed`, or ''. A
    stage may not get fewer than 0, nor a 0 the space would not give it itself (a frozen feature extractor
    is stage 1 alone) unless the user set that 0; the stages must add up to opts.max_epochs (ASHA's max_t)."""
    def values(f: dict[str, Any]) -> list[dict[str, Any]]:  # the space's own values and --set's, per draw
        return draw(lambda trial: {**space.sample(Suggest(trial, f), opts), **f})[0]

    unset = values({k: v for k, v in fixed.items() if k not in STAGE_KEYS})
    zero_ok = {k for v in unset for k in (1, 2) if v.get(f"stage{k}_epochs", 1) == 0}
    given = [f"{k}={fixed[k]}" for k in STAGE_KEYS if k in fixed]
    cause = f"--set {', '.join(given)}" if given else f"space {space.name!r}"
    for cfg in values(fixed):
        epochs = {k: int(cfg.get(f"stage{k}_epochs", getattr(TrialConfig, f"stage{k}_epochs"))) for k in (1, 2, 3)}
        plan = " + ".join(f"stage{k} {e}" for k, e in epochs.items() if k < 3 or e)
        for k, e in epochs.items():
            if e < 0 or (e == 0 and k < 3 and k not in zero_ok and f"stage{k}_epochs" not in fixed):  # 3: a 2-stage plan
                return f"{cause} leaves stage {k} {e} epochs of the {opts.max_epochs}-epoch budget ({plan})"
        if sum(epochs.values()) != opts.max_epochs:
            return (f"{cause} makes a trial {sum(epochs.values())} epochs ({plan}) but every trial gets "
                    f"{opts.max_epochs} (ASHA's max_t)")
    return ""


def check_budget(space: Space, opts: Options, fixed: dict[str, Any]) -> None:
    """A UserError naming the first sampled trial that does not fit the epoch budget, and the fixes that work."""
    problem = budget_problem(space, opts, fixed)
    if not problem:
        return
    fixes = []
    if "stage3_epochs" not in fixed and not budget_problem(space, opts, {**fixed, "stage3_epochs": 0}):
        fixes.append("--set stage3_epochs=0")
    # the smallest budget that fits, if any does within reason
    m = next((m for m in range(opts.max_epochs + 1, 4 * opts.max_epochs + 9)
              if not budget_problem(space, dataclasses.replace(opts, max_epochs=m), fixed)), None)
    if m is not None:
        fixes.append(f"--max-epochs {m}")
    set_epochs = [k for k in STAGE_KEYS if k in fixed]
    if set_epochs:
        fixes.append(f"drop --set {', '.join(set_epochs)} (the space splits --max-epochs itself)")
    raise UserError(f"{problem}: {' or '.join(fixes) if fixes else 'change the --set stage values'}")


def check_models(configs: list[dict[str, Any]]) -> None:
    """One training-mode forward pass of each backbone (random init) at the smallest input size the configs
    give it: a size the network shrinks to nothing fails here with one line instead of in every trial."""
    smallest: dict[tuple[str, bool], int] = {}
    for c in configs:
        key = (c["backbone"], bool(c["small_input_stem"]))
        smallest[key] = min(smallest.get(key, c["input_size"]), c["input_size"])
    for (backbone, stem), size in smallest.items():
        net = create_model(backbone, pretrained=False, small_input_stem=stem)  # its UserErrors propagate
        err = forward_error(net, size)
        if err:
            ok = next((p for p in PROBE_SIZES if p > size and not forward_error(net, p)), None)
            fix = f"use input_size >= {ok}" if ok else "choose another backbone"
            raise UserError(f"input_size {size} is too small for {backbone}"
                            f"{' with small_input_stem' if stem else ''} ({err}): {fix}")


def forward_error(net: Any, size: int) -> str:
    """'' when a batch of 2 goes through `net` at `size` px, else the error's first line."""
    net.train()  # BatchNorm in training mode, as stages 2 and 3 run it
    try:
        with torch.no_grad():
            net(torch.zeros(2, 3, size, size))
    except (RuntimeError, ValueError) as e:
        return (str(e).splitlines() or [type(e).__name__])[0][:120]
    return ""
