"""python benchmarks/shift.py SRC_DATA_DIR OUT_DATA_DIR [--shift invert]: a cifar-100-python copy shifted off ImageNet's
photos (labels kept), where frozen features are no longer unusually strong: a stress setting for the duel."""
import argparse
import pickle
import shutil
from pathlib import Path

import numpy as np

from trainable import atomic

SHIFTS = {"invert": lambda x: 255 - x,
          "bgr": lambda x: x.reshape(len(x), 3, 1024)[:, ::-1].reshape(len(x), 3072)}  # channels swapped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder holding cifar-100-python/")
    p.add_argument("out", help="folder to write cifar-100-python/ into")
    p.add_argument("--shift", default="invert", choices=sorted(SHIFTS))
    a = p.parse_args(argv)
    src, out = Path(a.src) / "cifar-100-python", Path(a.out) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "meta", out / "meta")
    for split in ("train", "test"):
        with open(src / split, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        d["data"] = np.ascontiguousarray(SHIFTS[a.shift](np.asarray(d["data"], dtype=np.uint8)), dtype=np.uint8)
        atomic.write_bytes(out / split, pickle.dumps(d, protocol=4))
        print(f"{out / split}: {len(d['data'])} images, {a.shift}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
