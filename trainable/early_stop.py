"""Early stopping on val_loss, per stage: a stage ends after `patience` epochs without a new low.

Each stage is a fit of its own (progressive unfreezing recipes stop each phase separately); when
the last stage stops, the trial ends. Independent of ASHA, which compares trials with each other.
(torch has no early stopping; Tune's stoppers end a whole trial, not one of its stages.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStop:
    patience: int  # 0 = never stop
    min_delta: float = 1e-4  # an improvement smaller than this does not count (Keras's min_delta)
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, val_loss: float) -> bool:
        """Record one epoch's val_loss; True when the stage should end now."""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)
