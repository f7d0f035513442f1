"""SearchSettings: every run_search.py knob, defined once. The CLI and the `--config` YAML loader are derived
from it (timm train.py style: YAML values become the parser's defaults, explicit flags still win)."""
from __future__ import annotations

import argparse
import contextlib
import re
import socket
import sys
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, get_args, get_type_hints


from analysis.command import command, examples
from analysis.experiment import load_yaml
from spaces import NAMES
from trainable.config import PrecisionName, as_type, coerce, split_assignment
from trainable.errors import UserError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
NAME_MAX = 255  # bytes of one folder name on common filesystems


def parse_duration(text: str) -> float:
    """"90m", "1.5h", "600s", "600" (seconds), "1h30m" -> seconds. Raises UserError."""
    t = text.strip().lower().replace(" ", "")
    t = t + "s" if re.fullmatch(r"[\d.]+", t) else t  # a bare number is seconds
    if not re.fullmatch(r"(\d+(\.\d+)?[smhd])+", t):
        raise UserError(f"--time-budget {text!r} is not a duration: write e.g. 90m, 2h, 1h30m or 600s")
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", t))
    if seconds <= 0:
        raise UserError(f"--time-budget {text!r} must be more than 0")
    return seconds


def _opt(default: Any, text: str, group: str = "search", *, choices: tuple[str, ...] = (),
         check: Callable[[Any], str] | None = None) -> Any:
    """A setting (its type is its annotation's): its flag's help and group; `choices` or `check` (value -> what
    is wrong with it, '' when nothing) apply to flags and --config alike (`check_settings`)."""
    return field(default=default, metadata={"help": text, "group": group, "choices": choices, "check": check})


def _must(ok: Callable[[Any], bool], problem: str) -> Callable[[Any], str]:
    return lambda v: "" if ok(v) else problem  # nan fails every comparison: refused


def _at_least(lo: int, hint: str = "") -> Callable[[Any], str]:
    return _must(lambda v: v >= lo, f"must be >= {lo}{hint}")


def _bindable_host(v: str) -> str:
    """Ray's dashboard must be able to listen there: an address of this machine."""
    try:
        infos = socket.getaddrinfo(v, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return "is not a host name or address: use 127.0.0.1 (or 0.0.0.0 for every interface)"
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock, contextlib.suppress(OSError):
            sock.bind((addr[0], 0))
            return ""
    return "is not an address of this machine: use 127.0.0.1 (or 0.0.0.0 for every interface)"


def folder_name_problem(name: str) -> str:
    """What keeps `name` from being one plain folder name inside --storage-path, or ''."""
    if name in ("", ".", ".."):
        return "is not a folder name"
    if any(c in name for c in "/\\"):
        return "holds a path separator: give a plain folder name (--storage-path says where it goes)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if name.startswith("-"):
        return "starts with '-' (it would read as an option)"
    if name != name.strip():
        return "starts or ends with a space"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    return ""


@dataclass
class SearchSettings:
    # resources
    gpus: int | None = _opt(None, "total GPUs for a local Ray (default: all visible; 0 = CPU only)", "resources",
                            check=_at_least(0, ": pass 0 for CPU only"))
    gpus_per_trial: float | None = _opt(None, "GPUs per trial, fractions allowed (default 1 when --gpus > 0)", "resources",
                                        check=_must(lambda v: v > 0, "must be > 0"))
    cpus_per_trial: int | None = _opt(None, "CPUs per trial (default: 1 on CPU, 2 with GPUs)", "resources", check=_at_least(1))
    max_concurrent: int = _opt(0, "most trials at once (0 = as many as resources allow)", "resources", check=_at_least(0))
    address: str = _opt("", "join this Ray cluster instead of starting a local one (e.g. auto)", "resources")
    dashboard_host: str = _opt("127.0.0.1", "Ray dashboard bind address (anything but localhost is a risk)", "resources",
                               check=_bindable_host)
    dashboard_port: int | None = _opt(None, "Ray dashboard port (default: 8265, or the next free one; 0: any free port; a given "
                                            "port that is taken: any free one)", "resources",
                                      check=_must(lambda v: 0 <= v <= 65535, "must be 0..65535"))
    # the search
    space: str | None = _opt(None, "search space or recipe from spaces/ (default: default; cpu with no GPU)",
                             check=_must(lambda v: v in NAMES, "is an unknown space: see --list-spaces"))
    backbones: str = _opt("", "comma-separated subset of the space's backbones")
    num_samples: int | None = _opt(None, "trials to run (default 16; with --time-budget: until the budget is spent)", check=_at_least(1))
    time_budget: str = _opt("", "stop the search after this much wall time from the command's start, e.g. 90m, 2h, 600s (--resume gets what is left)")
    warm_start: str = _opt("recipes", "first trials: 'recipes' (the hand-made recipes as points of the space), 'none', or "
                                      "earlier experiment folders DIR[,DIR...] whose finished trials the searcher is told "
                                      "first (combine: recipes,DIR)")
    estimate: bool = _opt(False, "measure and print the search's cost estimate, then exit without training")
    max_epochs: int | None = _opt(None, "cap on a trial's epochs over all stages (default: the space's)", check=_at_least(1))
    grace_period: int | None = _opt(None, "ASHA: epochs every trial gets before it can be pruned (default: after the space's "
                                          "longest head-only stage 1, so every trial is judged with trained blocks)",
                                    check=_at_least(1))
    reduction_factor: int = _opt(3, "ASHA: keep the top 1/N at each rung", check=_at_least(2))
    scheduler: str = _opt("asha", "asha (prune weak trials at rungs) or fifo (run every trial to the end)", choices=("asha", "fifo"))
    sampler: str = _opt("incumbent", "how Optuna proposes configs after the warm start: incumbent (small moves of the best "
                                     "config mixed with TPE), tpe (model-based) or random",
                        choices=("incumbent", "tpe", "random"))
    screen: str = _opt("auto", "auto: when the recipe points don't fit a third of the budget whole, run them on a fraction of "
                               "the data first and promote the best (the budget plan says so), except those whose screen run "
                               "would be mostly start-up and validation; a budget too short for the screen and one promotion "
                               "runs them whole, cheapest first. on: screen every point; off: run them whole",
                       choices=("auto", "on", "off"))
    compile: bool = _opt(False, "torch.compile each trial's model (pays off for long GPU trials)")
    precision: str = _opt("auto", "auto (bf16 on GPUs with compute capability 8.0+, fp16 + GradScaler on older ones, fp32 on "
                                  "the CPU), fp32, bf16 or fp16", choices=get_args(PrecisionName))
    max_failures: int = _opt(2, "restarts of a crashed trial from its last checkpoint", check=_at_least(0))
    seed: int = _opt(0, "seed of the searcher, the data split and the trials",
                     check=_must(lambda v: 0 <= v <= 2**31 - 1, f"must be 0..{2**31 - 1}"))
    set: list[str] = _opt(None, "fix a hyper-parameter for every trial: KEY=VALUE (repeatable)")
    # data and weights
    data_dir: str = _opt("./data", "folder holding cifar-100-python/ (downloaded there when absent)", "data")
    subset: int | None = _opt(None, "keep N images per class of the training file (quick runs)", "data", check=_at_least(1))
    val_fraction: float = _opt(0.1, "fraction of the training file held out for validation", "data",
                               check=_must(lambda v: 0 < v < 1, "must be between 0 and 1 (e.g. 0.1)"))
    weights_dir: str = _opt("", "offline pretrained weights: <timm model name>.pth state_dicts", "data")
    no_pretrained: bool = _opt(False, "train from random init instead of ImageNet weights", "data")
    # output
    storage_path: str = _opt("./runs", "where experiments are written: a folder (on a multi-node cluster one every node "
                                       "shares) or a cloud URI such as s3://BUCKET/runs or gs://BUCKET/runs", "output")
    storage_shared: bool = _opt(False, "--storage-path is a folder mounted on every node of the --address cluster (NFS, ...)",
                                "output")
    local_dir: str = _opt("", "with a cloud --storage-path: the local folder for this driver's copy of the experiment "
                              "(optuna.db, settings, best_config; uploaded to the URI as the search runs and when it ends); "
                              "it holds DIR/NAME; empty: ~/.cache/cifar-tune/runs/SCHEME/BUCKET/PATH/NAME", "output")
    name: str = _opt("", "experiment name (default: SPACE-DATE-TIME)", "output", check=folder_name_problem)
    resume: bool = _opt(False, "continue the experiment --name after a crash or Ctrl-C", "output")
    config: str = _opt("", "YAML file setting any of these options (flags given here win)", "output")
    list_spaces: bool = _opt(False, "list the search spaces and recipes, then exit", "output")

    def fixed(self) -> dict[str, Any]:
        """The --set values typed as TrialConfig's fields (UserError for an unknown key, a bad value, or a
        run field that has its own option: --set would skip that option's checks)."""
        given = dict(split_assignment(item) for item in self.set or [])
        for key in given.keys() & OWN_OPTION.keys():
            raise UserError(f"--set {key}={given[key]}: {key} is set by {OWN_OPTION[key]}, not --set")
        return coerce(given)

    def trial_base(self) -> dict[str, Any]:
        """The search-wide fields of every trial's config (below a space's and --set's values)."""
        return {"pretrained": not self.no_pretrained, "weights_dir": self.weights_dir, "seed": self.seed,
                "compile": self.compile, "precision": self.precision}

    def budget_s(self) -> float | None:
        return parse_duration(self.time_budget) if self.time_budget else None


# trial fields that are search-wide options of their own (checked there; the screen sets train_fraction itself)
OWN_OPTION = {"weights_dir": "--weights-dir DIR", "pretrained": "--no-pretrained", "compile": "--compile",
              "precision": "--precision", "train_fraction": "the budget plan's screen (use --subset N to search on "
              "fewer images per class)"}

# each setting's value type, from its annotation: int for `int | None`, str for `list[str]`, bool for a switch
KINDS = {name: next((a for a in get_args(hint) if a is not type(None)), hint)
         for name, hint in get_type_hints(SearchSettings).items()}


def check_settings(s: SearchSettings) -> None:
    """Every setting against its field's `choices` and `check` (None and '' are the defaults, not
    checked), --time-budget and the form of --set. Raises UserError naming the flag and the fix."""
    for f in fields(s):
        value, meta = getattr(s, f.name), f.metadata
        if value is None or value == "":
            continue
        flag = "--" + f.name.replace("_", "-")
        if meta["choices"] and value not in meta["choices"]:
            raise UserError(f"{flag} {value!r} is not one of {', '.join(meta['choices'])}")
        problem = meta["check"](value) if meta["check"] else ""
        if problem:
            raise UserError(f"{flag} {value!r} {problem}")
    s.budget_s()  # parse_duration's UserError names the forms it takes
    for item in s.set or []:
        split_assignment(item)  # its UserError shows the form


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line (the usage of 40 options would bury it)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog's example commands kept one per line."""


def build_parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = OneLineParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    groups: dict[str, Any] = {}
    for f in fields(SearchSettings):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        if f.name == "set":
            group.add_argument(flag, action="append", metavar="KEY=VALUE", help=meta["help"])
        elif KINDS[f.name] is bool:
            group.add_argument(flag, action="store_true", help=meta["help"])
        else:  # a help text that explains its own default gets no second "(default: None)"
            own = "default" in meta["help"]
            group.add_argument(flag, type=KINDS[f.name], default=f.default, choices=meta["choices"] or None,
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
    s = SearchSettings(**vars(parser.parse_args(argv)))
    check_settings(s)  # flags and --config values alike (argparse leaves --config's defaults unchecked)
    return s


def load_yaml_settings(path: str) -> dict[str, Any]:
    data = load_yaml(Path(path), "--config", "fix the file, or check the path")
    if not isinstance(data, (dict, type(None))):
        raise UserError(f"--config {path} must be a mapping of option: value, not {type(data).__name__}")
    known = {f.name: f for f in fields(SearchSettings) if f.name != "config"}
    out = {}
    for key, value in (data or {}).items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"--config {path}: {key!r} is not a setting; see run_search.py --help")
        out[name] = _yaml_value(known[name], value, f"--config {path}: {key!r}")
    return out


def _yaml_value(f: Field, value: Any, where: str) -> Any:
    """A YAML value as its flag would have parsed it (argparse types string defaults only)."""
    kind = KINDS[f.name]
    if value is None and f.default is None:
        return None
    if f.name == "set":  # a list of KEY=VALUE, one KEY=VALUE, or a mapping of them
        items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
        items = [items] if isinstance(items, str) else items
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return items
        raise UserError(f"{where} must be a list of KEY=VALUE strings or a mapping, not {value!r}")
    if kind is bool:  # a switch takes a YAML boolean, not a truthy string
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, not {value!r}")
    try:
        if not isinstance(value, (bool, list, dict)):
            return as_type(kind, value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise UserError(f"{where} must be {'an' if kind is int else 'a'} {kind.__name__}, not {value!r}")
