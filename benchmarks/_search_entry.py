"""run_search.py as the benchmark runs it: the same CLI, with one optional change.

    python benchmarks/_search_entry.py [--same-configs] RUN_SEARCH_ARGS...

--same-configs: Optuna's TPE adapts to the results it has seen, so an ASHA search and a FIFO
search with the same --seed draw the same configs only for TPE's random start-up trials (10 by
default) and then diverge. With this flag the searcher is TPE with its start-up phase stretched
over all --num-samples trials: every config is drawn by TPE's own seeded RandomSampler, in
order, independent of results, so both searches get exactly the same configs (the benchmark
checks this from params.json). Everything else (scheduler, trials, reporting) is unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SameConfigsTPE(optuna.samplers.TPESampler):
    """TPE with its seed and options, but all `num_samples` trials in its seeded random start-up
    phase. At module level so that Tune can pickle the searcher with it."""
    num_samples = 10

    def __init__(self, *args, **kwargs):
        kwargs["n_startup_trials"] = max(self.num_samples, kwargs.get("n_startup_trials", 10))
        super().__init__(*args, **kwargs)


def _same_configs(num_samples: int) -> None:
    """Every TPESampler the project builds becomes a SameConfigsTPE."""
    SameConfigsTPE.num_samples = num_samples
    optuna.samplers.TPESampler = SameConfigsTPE


def main(argv: list[str]) -> int:
    same = "--same-configs" in argv
    argv = [a for a in argv if a != "--same-configs"]
    if same:
        from search.settings import parse_settings
        _same_configs(parse_settings(argv).num_samples)
    import run_search
    return run_search.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
