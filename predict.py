"""python predict.py MODEL.pt IMAGE [IMAGE ...] [--json]: top-5 classes of any image file.

MODEL.pt is the analysis/model.pt analyze.py writes. Each image is read as a viewer shows it (first
frame, EXIF orientation, transparency over white, 16-bit and float data scaled, ICC profile to sRGB),
shrunk to 32x32 like the dataset's images (box filter), then takes the test images' path through the
model's eval transform. app.py uses these functions too.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import struct
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, PngImagePlugin, features

from analysis.command import command, examples
from analysis.final import load_trained
from trainable.augment import eval_transform
from trainable.errors import UserError
from trainable.loop import halving_batches

try:  # phones save HEIC: Pillow opens it when the pillow-heif plugin is installed
    from pillow_heif import register_heif_opener
except ImportError:
    pass
else:
    register_heif_opener()

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
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a model file: pass the analysis/model.pt that analyze.py wrote")
    if not p.is_file():
        raise UserError(f"model {p} not found: pass the analysis/model.pt that analyze.py wrote")
    try:
        net, ckpt = load_trained(p)
    except UserError as e:  # a config this code no longer reads
        raise UserError(f"{p} was written by another version of the project: {e}") from None
    # a truncated zip makes torch's reader fail with OSError EINVAL, an older format with RuntimeError
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{p} cannot be read as a model.pt written by analyze.py ({type(e).__name__}: {reason}): "
                        f"it is truncated or damaged, or another file; copy it again, or pass "
                        f"EXPERIMENT/analysis/model.pt") from None
    return Model(net, list(ckpt["fine_names"]), int(ckpt["config"]["input_size"]),
                 tuple(ckpt["mean"]), tuple(ckpt["std"]), p)


def read_image(src: str | Path | IO[bytes], name: str = "") -> Image.Image:
    """The picture a person sees in an image file (module docstring), from a path or a binary file object;
    `name` labels it in errors. A PNG whose metadata exceeds Pillow's text limits is read without it.
    UserError naming the file and the reason when it cannot be read or is over Image.MAX_IMAGE_PIXELS."""
    label = name or str(src)
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise UserError(f"image {label} not found: check the path")
    data = b""
    try:
        if isinstance(src, (str, Path)):
            data = Path(src).read_bytes()
        else:
            src.seek(0)
            data = src.read()
        if not data:
            raise UserError(f"{label} is an empty file (0 bytes): pass the image itself, not an empty copy")
        try:
            return _decode(io.BytesIO(data), label)
        except ValueError as e:
            if "MAX_TEXT" not in str(e):  # Pillow's limits on PNG text and ICC chunks
                raise
            png, icc = _png_within_metadata_limits(data, e)
            return _decode(io.BytesIO(png), label, icc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_big(label, int(found.group(1)) if found else None) from None
    except Image.UnidentifiedImageError:
        raise _not_readable(label, data[:512]) from None
    except PermissionError as e:
        raise UserError(f"cannot read image {label} ({e.strerror}): check its permissions") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, MemoryError) as e:
        # what Pillow's decoders raise for a damaged file, depending on the format
        reason = " ".join(str(e).split()) or type(e).__name__
        what = "truncated (the file ends before its image data does)" if "truncated" in reason.lower() else "corrupt"
        raise UserError(f"{label} is {what}, Pillow cannot decode it ({reason}): "
                        f"pass an intact copy of the image") from None


def _decode(src: IO[bytes], label: str, icc: bytes | None = None) -> Image.Image:
    """read_image's decoding, Pillow's exceptions unchanged; `icc` replaces the file's own profile."""
    with warnings.catch_warnings():
        # Pillow's warnings about a damaged file would add lines to the one-line error (or to a
        # prediction that worked); it only warns between 1x and 2x its pixel limit: refused too
        warnings.filterwarnings("ignore", module=r"PIL\.")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(src) as im:
            if Image.MAX_IMAGE_PIXELS is not None and im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:
                raise _too_big(label, im.size[0] * im.size[1])  # also when another thread reset the filter
            im.load()  # the first frame: what a viewer shows of an animated or multi-page file
            if icc is not None:
                im.info["icc_profile"] = icc
            return _to_rgb(ImageOps.exif_transpose(im))


ICC_LIMIT = 64 << 20  # bytes: the largest ICC profile read (real ones reach a few MB; Pillow stops at 1 MB)
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")


def _png_within_metadata_limits(data: bytes, error: Exception) -> tuple[bytes, bytes | None]:
    """(the PNG without its oversize metadata, its ICC profile inflated up to ICC_LIMIT or None).
    Pillow refuses a whole PNG whose iCCP or text inflates past its limits and has no switch to skip
    those chunks; re-raises `error` when `data` is not a PNG's chunk sequence."""
    sig = b"\x89PNG\r\n\x1a\n"
    if not data.startswith(sig):
        raise error
    out, icc, text, pos = [sig], None, 0, len(sig)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        body = data[pos + 8:pos + 8 + length]
        keep = True
        if kind == b"iCCP":
            keep = False
            sep = body.find(b"\0")
            icc = _inflate(body[sep + 2:], ICC_LIMIT) if sep >= 0 else None
        elif kind in _PNG_TEXT:
            size = _text_size(kind, body, PngImagePlugin.MAX_TEXT_CHUNK)
            keep = size is not None and text + size <= PngImagePlugin.MAX_TEXT_MEMORY // 2
            text += size if keep else 0
        if keep:
            out.append(data[pos:end])
        pos = end
    if pos < len(data):
        out.append(data[pos:])  # a cut-off tail: Pillow reports it as it would have
    return b"".join(out), icc


def _inflate(blob: bytes, limit: int) -> bytes | None:
    """zlib data inflated, or None when it is damaged or inflates past `limit` bytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(blob, limit)
    except zlib.error:
        return None
    return None if d.unconsumed_tail else out


def _text_size(kind: bytes, body: bytes, limit: int) -> int | None:
    """The bytes a PNG text chunk's value takes once read, or None past `limit` (or undecodable)."""
    key, _, value = body.partition(b"\0")
    if kind == b"tEXt":
        return len(value) if len(value) <= limit else None
    if kind == b"zTXt":
        v = _inflate(value[1:], limit)
        return None if v is None else len(v)
    compressed, rest = value[:1] == b"\1", value[2:]  # iTXt: flag, method, language\0, keyword\0, text
    parts = rest.split(b"\0", 2)
    if len(parts) < 3:
        return 0
    v = _inflate(parts[2], limit) if compressed else parts[2]
    return None if v is None or len(v) > limit else len(v)


# first bytes of formats people have as pictures that Pillow does not open: (test, what it is, advice)
_FORMATS = (
    (lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1",
                                                 b"msf1"),
     "a HEIC/HEIF photo, which this Pillow cannot read",
     "install the pillow-heif plugin (pip install pillow-heif) or convert it to JPEG"),
    (lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"avif", b"avis") and not features.check("avif"),
     "an AVIF image, which this Pillow cannot read", "use Pillow 11.3 or later or convert it to PNG or JPEG"),
    (lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"avif", b"avis"),
     "an AVIF image Pillow's AVIF decoder cannot open", "it may be damaged: convert an intact copy to PNG or JPEG"),
    (lambda h: h.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")), "a JPEG XL image, which Pillow cannot read",
     "convert it to PNG or JPEG"),
    (lambda h: b"<svg" in h.lower(), "an SVG drawing (vector graphics), not a picture of pixels", "export it to PNG"),
    (lambda h: h.startswith(b"%PDF"), "a PDF document, not an image", "export the page as PNG or JPEG"),
    (lambda h: h[4:8] == b"ftyp", "a video or other ISO media file, not a still image",
     "pass a still image (PNG, JPEG, ...)"),
)


def _not_readable(label: str, head: bytes) -> UserError:
    """Why Pillow found no image in a file: a format it does not read, or not an image at all."""
    for test, fmt, advice in _FORMATS:
        if test(head):
            return UserError(f"{label} is {fmt}: {advice}")
    return UserError(f"{label} is not an image Pillow can read (its first bytes match no image format): "
                     f"pass a PNG, JPEG, WebP, TIFF or another format Pillow opens")


def _too_big(label: str, pixels: int | None) -> UserError:
    size = f"{pixels:,} pixels, " if pixels else ""
    return UserError(f"{label} is too large to decode safely ({size}over the limit of "
                     f"{Image.MAX_IMAGE_PIXELS:,} pixels, PIL.Image.MAX_IMAGE_PIXELS): pass a smaller image")


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a loaded image in any mode, alpha composited over white."""
    icc = im.info.get("icc_profile")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _high_depth_to_8bit(im)
    if im.mode == "La":  # premultiplied alpha: Pillow converts it to RGB(A) only via LA
        im = im.convert("LA")
    alpha = None
    if im.has_transparency_data:  # an alpha band, a tRNS chunk or a GIF transparent index
        rgba = im.convert("RGBA")
        alpha, im = rgba.getchannel("A"), rgba.convert("RGB")
    if icc and im.mode in ("RGB", "CMYK", "L"):
        im = _to_srgb(im, icc)
    im = im.convert("RGB")
    if alpha is not None and alpha.getextrema()[0] < 255:
        im = Image.composite(im, Image.new("RGB", im.size, (255, 255, 255)), alpha)
    return im


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    """L (LA with a tRNS grey) from 16-bit, 32-bit integer or float data, scaled to 0..255 (Pillow's
    convert clips, which turns a 16-bit photo white): integers within 0..65535 as 16-bit, floats within
    0..1 or 0..255 on that scale, anything else stretched from its minimum to its maximum."""
    raw = np.asarray(im)
    a = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif im.mode == "F" and lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (gray, alpha))
    return gray


def _to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """`im` moved from its embedded ICC profile to sRGB (as viewers show it); unchanged when the
    profile is unusable or does not fit the mode, since the pixels are still a fair picture."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im


def to_model_input(rgb: Image.Image) -> torch.Tensor:
    """uint8 tensor [3, 32, 32]: an RGB image shrunk like the dataset's images (box filter)."""
    small = rgb.convert("RGB").resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def probabilities(model: Model, images: list, batch_size: int = 64) -> torch.Tensor:
    """Softmax over the fine classes, [N, classes], for uint8 [3,32,32] images, `batch_size` at a time
    (64 at 224 px peaks near 1.2 GB on the CPU), halved while a batch runs out of memory."""
    x = torch.stack(images)

    def step(rows: slice) -> torch.Tensor:
        out = model.net(eval_transform(x[rows], model.input_size, model.mean, model.std))
        return (out[0] if isinstance(out, tuple) else out).float().softmax(dim=1)

    with torch.inference_mode():
        parts, _ = halving_batches(len(images), batch_size, step)
    return torch.cat(parts)


def image_paths(args: list[str]) -> list[Path]:
    """The image files the arguments name, in order: a file as given, a folder as its files with an image
    extension Pillow knows (sorted, not recursive). UserError for a folder without one."""
    known = set(Image.registered_extensions())
    out = []
    for a in map(Path, args):
        if not a.is_dir():
            out.append(a)  # read_image says what is wrong with it, if anything
            continue
        found = sorted(f for f in a.iterdir() if f.is_file() and f.suffix.lower() in known)
        if not found:
            raise UserError(f"folder {a} holds no image file (.png, .jpg, ... as Pillow reads): pass image files "
                            f"or a folder of them")
        out += found
    return out


def predict_files(model_path: str | Path, paths: list[str], k: int = 5) -> list[dict[str, Any]]:
    """[{"image": path, "top": [{"class", "probability"} x k]}] per image file (a folder: each image in it), in
    the given order."""
    paths = image_paths(paths)
    images = [to_model_input(read_image(p)) for p in paths]  # every image first: a bad one fails before the model loads
    model = load_model(model_path)
    out = []
    for p, row in zip(paths, probabilities(model, images)):
        values, idx = row.topk(min(k, len(model.names)))
        out.append({"image": str(p), "top": [{"class": model.names[int(i)], "probability": round(float(v), 6)}
                                             for v, i in zip(values, idx)]})
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples(
        ("the 3 likeliest classes of two images", command("predict.py", "runs/NAME/analysis/model.pt", "cat.jpg",
                                                          "dog.png", "--top", "3"))))
    p.add_argument("model", help="analysis/model.pt written by analyze.py")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads), or folders of them")
    p.add_argument("--top", type=int, default=5, help="how many classes to show per image (default: %(default)s)")
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
