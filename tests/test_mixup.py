"""Training with timm's mixup and cutmix on: coarse targets derived from the mixed fine ones,
lambda drawn from the trial's seeded generator, and a resumed run that continues identically."""
from __future__ import annotations

import shutil

import pytest
import torch
from timm.data.mixup import mixup_target

from tests.fake_cifar import write_fake_cifar
from trainable.data import prepare_search_data
from trainable.loop import coarse_matrix, make_mixup, mix_batch
from trainable.model import NUM_COARSE, NUM_FINE
from trainable.trial import run_trial

SMOOTHING = 0.1


def _labels(batch: int = 16):
    fine = torch.randperm(NUM_FINE, generator=torch.Generator().manual_seed(3))[:batch]  # distinct
    coarse_of = torch.arange(NUM_FINE) // 5  # 5 fine classes per superclass, as in CIFAR-100
    return fine, coarse_of[fine], coarse_matrix(torch.arange(NUM_FINE), coarse_of)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_coarse_targets_are_the_mixed_fine_ones_mapped(mixup_alpha, cutmix_alpha):
    """What timm would give for the coarse labels mixed with the same lambda."""
    fine, coarse, m = _labels()
    mix = make_mixup(mixup_alpha, cutmix_alpha, SMOOTHING)
    x = torch.rand(len(fine), 3, 32, 32)
    _, soft_fine, soft_coarse = mix_batch(mix, x, fine, m, torch.Generator().manual_seed(0))
    off, on = SMOOTHING / NUM_FINE, 1 - SMOOTHING + SMOOTHING / NUM_FINE
    lam = float((soft_fine[0, fine[0]] - off) / (on - off))  # fine[0] != fine[-1], so this is lambda
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(soft_coarse, mixup_target(coarse, NUM_COARSE, lam, SMOOTHING), atol=1e-6)
    assert torch.allclose(soft_coarse.sum(1), torch.ones(len(fine)))


def test_the_trials_generator_decides_lambda():
    fine, _, m = _labels()
    mix = make_mixup(0.8, 1.0, SMOOTHING)
    x = torch.rand(len(fine), 3, 32, 32)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [mix_batch(mix, x.clone(), fine, m, g)[1] for _ in range(4)]
    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert len({round(float(t.max()), 6) for t in a}) > 1  # a new lambda per batch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_fake_cifar(tmp_path_factory.mktemp("fake"), train_per_class=4, test_per_class=1)
    return prepare_search_data(root, subset=None, val_fraction=0.25, seed=0, download=False)


def test_training_with_mixup_and_cutmix_resumes_identically(data, tmp_path):
    """3 epochs straight, against 1 epoch, a checkpoint, and 2 more from it: the same numbers, so
    the mixup draws continue where they were (numpy's global RNG is scrambled in between)."""
    torch.set_num_threads(1)
    cfg = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "batch_size": 50,
           "aug_strength": 0.3, "eval_batch_size": 200, "stage1_epochs": 1, "stage2_epochs": 2,
           "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "head": "coarse_to_fine", "seed": 5}
    saved = tmp_path / "after_epoch_1"
    straight: list[dict] = []

    def keep(m, ckpt):
        if m["epoch"] == 1:
            shutil.copytree(ckpt, saved)
        straight.append(m)
    run_trial(cfg, data.train, data.val, keep)
    import numpy as np
    np.random.seed(12345)  # whatever else used numpy's RNG meanwhile must not matter
    resumed: list[dict] = []
    run_trial(cfg, data.train, data.val, lambda m, _c: resumed.append(m), restore=saved)
    key = lambda rs: [(r["epoch"], round(r["train_loss"], 5), round(r["val_loss"], 5)) for r in rs]  # noqa: E731
    assert key(resumed) == key(straight[1:])
    assert all(r["status"] == "ok" and r["train_loss"] > 0 for r in straight)
    assert "val_coarse_head_acc" in straight[-1]
