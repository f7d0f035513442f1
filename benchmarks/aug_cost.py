"""python benchmarks/aug_cost.py: what perspective, grayscale and blur add to the strength-1 augmentation: ms per batch
of 256 32-px images on one thread (torch's Timer), without them ("before") and with them."""
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import md_table, parser, per_call
from trainable.augment import DeviceAugment, aug_policy


def main(argv: list[str] | None = None) -> None:
    parser(__doc__, data=False).parse_args(argv)
    now = aug_policy(1.0)
    before = dataclasses.replace(now, perspective=0.0, blur_prob=0.0, grayscale_prob=0.0)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = []
    for size, seconds in ((32, 0.5), (224, 3.0)):
        ms = [1e3 * per_call(functools.partial(DeviceAugment(p, size, (0.5,) * 3, (0.5,) * 3), x), 1, seconds)
              for p in (before, now)]
        rows.append([f"{size} px", f"{ms[0]:.1f}", f"{ms[1]:.1f}", f"{ms[1] / ms[0]:.2f}"])
    print(md_table(["input", "before (ms / 256 images)", "now", "ratio"], rows))


if __name__ == "__main__":
    main()
