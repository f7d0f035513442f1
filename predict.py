"""python predict.py MODEL.pt IMAGE [IMAGE ...] [--json]: top-5 classes of any image file.

MODEL.pt is the analysis/model.pt analyze.py writes. Each image is read with PIL, converted to RGB,
shrunk to 32x32 like the dataset's images (box filter, as the stand-in set was made), then goes
through the model's own eval transform (resize to its input_size, its mean/std): the same path
the test images took. app.py uses these functions too.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from trainable.errors import UserError

SOURCE_SIZE = 32  # the dataset's image size: every image is brought to it first


@dataclass
class Model:
    net: Any  # trainable.model.Net, in eval mode on the CPU
    names: list[str]  # fine class names, index = class id
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    path: Path


def load_model(path: str | Path) -> Model:
    """The trained model of an analysis/model.pt; UserError when it is missing or not one."""
    import pickle
    import zipfile

    from trainable.final import load_trained
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model {p} not found: pass the analysis/model.pt that analyze.py wrote")
    try:
        net, ckpt = load_trained(p)
    except UserError as e:  # a config this code no longer reads
        raise UserError(f"{p} was written by another version of the project: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{p} is not a model.pt written by analyze.py ({type(e).__name__}): "
                        f"pass EXPERIMENT/analysis/model.pt") from None
    return Model(net, list(ckpt["fine_names"]), int(ckpt["config"]["input_size"]),
                 tuple(ckpt["mean"]), tuple(ckpt["std"]), p)


def load_image(src: str | Path | IO[bytes], name: str = ""):
    """uint8 tensor [3, 32, 32] from an image file path or a binary file object."""
    label = name or str(src)
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise UserError(f"image {label} not found: check the path")
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(src) as im:
            im = im.convert("RGB").resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BOX)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{label} is not an image PIL can read ({type(e).__name__}): "
                        f"pass a PNG, JPEG or similar file") from None
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def probabilities(model: Model, images: list) -> "torch.Tensor":
    """Softmax over the fine classes, [N, classes], for uint8 [3,32,32] images."""
    import torch

    from trainable.augment import eval_transform
    x = eval_transform(torch.stack(images), model.input_size, model.mean, model.std)
    with torch.inference_mode():
        out = model.net(x)
    logits = out[0] if isinstance(out, tuple) else out
    return logits.float().softmax(dim=1)


def top_k(probs, names: list[str], k: int = 5) -> list[tuple[str, float]]:
    """[(class name, probability)] of the k most likely classes, most likely first."""
    values, idx = probs.topk(min(k, len(names)))
    return [(names[int(i)], float(v)) for v, i in zip(values, idx)]


def predict_files(model_path: str | Path, paths: list[str], k: int = 5) -> list[dict[str, Any]]:
    images = [load_image(p) for p in paths]  # every image first: a bad one fails before the model loads
    model = load_model(model_path)
    probs = probabilities(model, images)
    return [{"image": str(p), "top": [{"class": c, "probability": round(v, 6)} for c, v in top_k(row, model.names, k)]}
            for p, row in zip(paths, probs)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="analysis/model.pt written by analyze.py")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--top", type=int, default=5, help="how many classes to show per image")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.top < 1:
            raise UserError(f"--top {args.top} must be >= 1")
        results = predict_files(args.model, args.images, args.top)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        width = max(len(t["class"]) for t in r["top"])
        for n, t in enumerate(r["top"], start=1):
            print(f"  {n}. {t['class']:<{width}}  {t['probability']:7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
