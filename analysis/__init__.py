"""The read side of an experiment, without Ray: trials from disk, how each ended, the best config,
the final retrain and test, the recipe baselines. search/ (Ray) writes what this reads."""
