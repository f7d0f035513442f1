"""SearchSettings: every run_search.py knob, defined once.

The argparse CLI and the `--config` YAML loader are derived from this dataclass (timm train.py
style: YAML values become the parser's defaults, explicit flags still win).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from analysis.command import command, examples
from trainable.config import split_assignment
from trainable.errors import UserError


def _opt(default: Any, help: str, type: Any = None, group: str = "search") -> Any:
    return field(default=default, metadata={"help": help, "type": type, "group": group})


@dataclass
class SearchSettings:
    # resources
    gpus: int | None = _opt(None, "total GPUs for a local Ray (default: all visible; 0 = CPU only)", int, "resources")
    gpus_per_trial: float | None = _opt(None, "GPUs per trial, fractions allowed (default 1 when --gpus > 0)", float, "resources")
    cpus_per_trial: int | None = _opt(None, "CPUs per trial (default: 1 on CPU, 2 with GPUs)", int, "resources")
    max_concurrent: int = _opt(0, "most trials at once (0 = as many as resources allow)", int, "resources")
    address: str = _opt("", "join this Ray cluster instead of starting a local one (e.g. auto)", str, "resources")
    dashboard_host: str = _opt("127.0.0.1", "Ray dashboard bind address (anything but localhost is a risk)", str, "resources")
    dashboard_port: int = _opt(8265, "Ray dashboard port (a free one is used when it is taken)", int, "resources")
    # the search
    space: str | None = _opt(None, "search space or recipe from spaces/ (default: default; cpu with no GPU)", str)
    backbones: str = _opt("", "comma-separated subset of the space's backbones", str)
    num_samples: int | None = _opt(None, "trials to run (default 16; with --time-budget: until the budget is spent)", int)
    time_budget: str = _opt("", "stop the search after this much wall time, e.g. 90m, 2h, 600s (--resume gets what is left)", str)
    warm_start: str = _opt("recipes", "first trials: 'recipes' (the hand-made recipes as points of the space), 'none', "
                                      "or earlier experiment folders DIR[,DIR...] whose finished trials the searcher is told first "
                                      "(combine: recipes,DIR)", str)
    estimate: bool = _opt(False, "measure and print the search's cost estimate, then exit without training", None)
    max_epochs: int | None = _opt(None, "cap on a trial's epochs over all stages (default: the space's)", int)
    grace_period: int | None = _opt(None, "ASHA: epochs every trial gets before it can be pruned (default: after the space's "
                                          "longest head-only stage 1, so every trial is judged with trained blocks)", int)
    reduction_factor: int = _opt(3, "ASHA: keep the top 1/N at each rung", int)
    scheduler: str = _opt("asha", "asha (prune weak trials at rungs) or fifo (run every trial to the end)", str)
    sampler: str = _opt("tpe", "how Optuna proposes configs after the warm start: tpe (model-based) or random", str)
    compile: bool = _opt(False, "torch.compile each trial's model (pays off for long GPU trials)", None)
    precision: str = _opt("auto", "auto (bf16 on GPUs with compute capability 8.0+, fp16 + GradScaler on older ones, fp32 on the CPU), fp32, bf16 or fp16", str)
    max_failures: int = _opt(2, "restarts of a crashed trial from its last checkpoint", int)
    seed: int = _opt(0, "seed of the searcher, the data split and the trials", int)
    set: list[str] = _opt(None, "fix a hyper-parameter for every trial: KEY=VALUE (repeatable)", str)
    # data and weights
    data_dir: str = _opt("./data", "folder holding cifar-100-python/ (downloaded there when absent)", str, "data")
    subset: int | None = _opt(None, "keep N images per class of the training file (quick runs)", int, "data")
    val_fraction: float = _opt(0.1, "fraction of the training file held out for validation", float, "data")
    weights_dir: str = _opt("", "offline pretrained weights: <timm model name>.pth state_dicts", str, "data")
    no_pretrained: bool = _opt(False, "train from random init instead of ImageNet weights", None, "data")
    # output
    storage_path: str = _opt("./runs", "where experiments are written: a folder (on a multi-node cluster one every node "
                                       "shares) or a cloud URI such as s3://BUCKET/runs or gs://BUCKET/runs", str, "output")
    storage_shared: bool = _opt(False, "--storage-path is a folder mounted on every node of the --address cluster (NFS, ...)", None, "output")
    local_dir: str = _opt("", "with a cloud --storage-path: the local folder for this driver's copy of the experiment "
                              "(optuna.db, settings, best_config; uploaded to the URI as the search runs and when it ends); "
                              "it holds DIR/NAME; empty: ~/.cache/cifar-tune/runs/SCHEME/BUCKET/PATH/NAME", str, "output")
    name: str = _opt("", "experiment name (default: SPACE-DATE-TIME)", str, "output")
    resume: bool = _opt(False, "continue the experiment --name after a crash or Ctrl-C", None, "output")
    config: str = _opt("", "YAML file setting any of these options (flags given here win)", str, "output")
    list_spaces: bool = _opt(False, "list the search spaces and recipes, then exit", None, "output")

    def fixed_params(self) -> dict[str, str]:
        """The --set KEY=VALUE pairs as a dict (values are coerced later by TrialConfig)."""
        return dict(split_assignment(item) for item in self.set or [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog's example commands kept one per line."""


def build_parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(SearchSettings):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        if f.name == "set":
            group.add_argument(flag, action="append", metavar="KEY=VALUE", help=meta["help"])
        elif meta["type"] is None:  # booleans are switches
            group.add_argument(flag, action="store_true", help=meta["help"])
        else:
            # a help text that explains its own default gets no second "(default: None)"
            own = "default" in meta["help"]
            group.add_argument(flag, type=meta["type"], default=f.default,
                               help=meta["help"] + ("%(default).0s" if own else ""))
    return parser


def parse_settings(argv: list[str] | None = None) -> SearchSettings:
    """Flags, with defaults taken from `--config FILE` when given."""
    offline = ["--data-dir", "../shared/data/tinyimagenet100-32", "--weights-dir", "../shared/weights",
               "--subset", "50", "--time-budget", "20m"]
    parser = build_parser("Search for the best way to fine-tune a pretrained network on CIFAR-100.", examples(
        ("a GPU machine with internet (CIFAR-100 and the weights are downloaded)",
         command("run_search.py", "--gpus", "4", "--num-samples", "64")),
        ("a CPU machine offline: local data and weights, 50 images per class, 20 minutes",
         command("run_search.py", *offline)),
        ("only the cost estimate of that search, without training", command("run_search.py", *offline, "--estimate"))))
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml_settings(pre.config))
    return SearchSettings(**vars(parser.parse_args(argv)))


def load_yaml_settings(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror}; check the path") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise UserError(f"--config {path} is not valid YAML{at}: fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of option: value, not {type(data).__name__}")
    known = {f.name: f for f in fields(SearchSettings)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config":
            raise UserError(f"--config {path}: {key!r} is not a setting; see run_search.py --help")
        out[name] = _yaml_value(known[name], value, f"--config {path}: {key!r}")
    return out


def _yaml_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """A YAML value as the flag would have parsed it (argparse leaves non-string defaults alone)."""
    if value is None and f.default is None:
        return None
    if f.name == "set":  # a list of KEY=VALUE, one KEY=VALUE, or a mapping of them
        items = [value] if isinstance(value, str) else value
        if isinstance(items, dict):
            items = [f"{k}={v}" for k, v in items.items()]
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return items
        raise UserError(f"{where} must be a list of KEY=VALUE strings or a mapping, not {value!r}")
    typ = f.metadata["type"]
    if typ is None:  # a switch
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, not {value!r}")
    if not isinstance(value, (bool, list, dict, type(None))):
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return typ(value)
        except ValueError:
            pass
    raise UserError(f"{where} must be {'an' if typ is int else 'a'} {typ.__name__}, not {value!r}")
