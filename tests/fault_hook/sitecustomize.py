"""Test-only: faults caused for real in the trials of a search run as a subprocess.

A test's monkeypatch cannot reach Ray's worker processes, but their environment comes from the
driver's: with this folder on PYTHONPATH (tests/test_faults.py `fault_env`) and
CIFAR_TUNE_FAULT=KIND@EPOCH[:KEY=VALUE] set, Python imports this module in every process, and
trainable.trial gets its `fit_epoch` wrapped when it is imported. At the start of global epoch
EPOCH of the trials whose config has KEY=VALUE, "crash" kills the worker process (only in a run
that did not start from a checkpoint, so a restarted trial goes on) and "oom" makes an
allocation no machine can satisfy.
"""
import importlib.abc
import importlib.util
import os
import sys

ENV = "CIFAR_TUNE_FAULT"


def parse(spec: str) -> tuple[str, int, str, str]:
    """"oom@2:freeze_bn=True" -> ("oom", 2, "freeze_bn", "True"); ValueError for another form."""
    kind_epoch, _, condition = spec.partition(":")
    kind, _, epoch = kind_epoch.partition("@")
    if kind not in ("crash", "oom") or not epoch.isdigit():
        raise ValueError(f"{ENV}={spec!r}: write KIND@EPOCH[:KEY=VALUE], KIND crash or oom")
    key, _, value = condition.partition("=")
    return kind, int(epoch), key.strip(), value.strip()


def wrap(trial, spec: str) -> None:
    """Make `trial.fit_epoch` (trainable/trial.py) fail as `spec` says."""
    kind, epoch, key, value = parse(spec)
    real = trial.fit_epoch

    fresh = []  # whether this process's trial started without a checkpoint, judged at its first epoch
    # (later, tune.get_checkpoint() returns the checkpoint this run itself reported)

    def fit_epoch(t, *args, **kwargs):
        if not fresh:
            from ray import tune
            fresh.append(tune.get_checkpoint() is None)
        if t.at.epoch == epoch and (not key or str(getattr(t.cfg, key)) == value):
            if kind == "oom":
                import torch
                torch.empty(1 << 60, dtype=torch.uint8)  # a real allocator failure (1 EiB)
            if fresh[0]:  # a first run, not a restart from a checkpoint
                os._exit(17)  # die like an OOM-killed worker: no exception, no cleanup
        return real(t, *args, **kwargs)
    trial.fit_epoch = fit_epoch


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps trainable.trial right after it is imported, so processes that never import it stay light."""

    def find_spec(self, name, path, target=None):
        if name != "trainable.trial":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            wrap(module, os.environ[ENV])
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(ENV):
    sys.meta_path.insert(0, _WrapOnImport())
