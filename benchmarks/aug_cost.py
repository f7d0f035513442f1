"""What the strength-1 augmentation costs since it also draws perspective, grayscale and blur.

python benchmarks/aug_cost.py: one CPU thread, 256 stand-in-sized images, ms per batch for the
strength-1 policy before 9f3ec60 (those three ops off) and now, at 32 and 224 px.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainable.augment import DeviceAugment, aug_policy  # noqa: E402


def ms_per_batch(policy, size: int, x: torch.Tensor, repeats: int) -> float:
    aug, g = DeviceAugment(policy, size, (0.5,) * 3, (0.5,) * 3), torch.Generator().manual_seed(0)
    aug(x, g)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        aug(x, g)
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    torch.set_num_threads(1)
    now = aug_policy(1.0)
    before = dataclasses.replace(now, perspective=0.0, blur_prob=0.0, grayscale_prob=0.0)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    print("| input | before (ms / 256 images) | now | ratio |\n|---|---|---|---|")
    for size, repeats in ((32, 10), (224, 3)):
        a, b = ms_per_batch(before, size, x, repeats), ms_per_batch(now, size, x, repeats)
        print(f"| {size} px | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
