"""What users really feed the product (issue 11): any image file Pillow opens, any CIFAR-format pickle.

Images: predict.read_image must hand the model the picture a person sees on a white page
(upright, first frame, alpha over white, 16-bit and float data scaled), and refuse
decompression bombs and damaged files with one line. CIFAR: every protocol 0-5, Python 2 or 3
writer, arrays or plain lists/bytes load the same; anything that could run code is refused
before it runs.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from tests.conftest import run_cli
from tests.fake_cifar import write_pickle
from trainable.data import load_cifar100
from trainable.errors import UserError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# ============================================================================ images: helpers


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, for what Pillow cannot write (16-bit RGB, lying headers)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _png16(pixels: np.ndarray, colour_type: int, extra: bytes = b"") -> bytes:
    """16-bit PNG from uint16 [H, W] (grey) or [H, W, C]."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return _png(w, h, 16, colour_type, rows, extra)


def _saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves(left, right, size=(8, 8), mode="RGB") -> Image.Image:
    """Left half one colour, right half another."""
    w, h = size
    im = Image.new(mode, size, left)
    im.paste(right, (w // 2, 0, w, h))
    return im


def _rgb(left, right, size=(8, 8)) -> np.ndarray:
    return np.asarray(_halves(left, right, size), dtype=np.int16)


def _read(blob: bytes, tmp_path: Path, suffix: str = ".img") -> np.ndarray:
    path = tmp_path / f"image{suffix}"
    path.write_bytes(blob)
    im = predict.read_image(path)
    assert im.mode == "RGB"
    return np.asarray(im, dtype=np.int16)


# ============================================================================ images: EXIF orientation


def _sideways_phone_jpeg(path: Path) -> Path:
    """The issue's photo: stored 64x32, left half red, right half blue, EXIF Orientation=6."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _halves(RED, BLUE, (64, 32)).save(path, "JPEG", quality=95, exif=exif)
    return path


def test_phone_jpeg_orientation_6_reaches_the_model_upright(tmp_path, monkeypatch, capsys):
    """Through the CLI's own path: the tensor the model gets has red on top, blue below."""
    path = _sideways_phone_jpeg(tmp_path / "phone.jpg")
    seen = []
    monkeypatch.setattr(predict, "load_model", lambda p: predict.Model(None, ["a", "b"], 32, (0,), (1,), Path(p)))

    def fake_probabilities(model, images):
        import torch
        seen.extend(images)
        return torch.tensor([[0.75, 0.25]] * len(images))
    monkeypatch.setattr(predict, "probabilities", fake_probabilities)
    assert predict.main(["model.pt", str(path)]) == 0
    (x,) = seen
    assert x.shape == (3, 32, 32) and str(x.dtype) == "torch.uint8"
    top, bottom = x[:, 2:14].float().mean((1, 2)), x[:, 18:30].float().mean((1, 2))  # away from the seam
    assert top[0] > 200 and top[2] < 50, f"top should be red, got {top.tolist()}"
    assert bottom[2] > 200 and bottom[0] < 50, f"bottom should be blue, got {bottom.tolist()}"
    assert "a" in capsys.readouterr().out

    upright = predict.read_image(path)
    assert upright.size == (32, 64)  # as viewers show it: portrait


# Where the stored pixel [i, j] comes from in the upright picture R (H x W), per EXIF 2.3 Orientation;
# written out by hand so the test does not borrow Pillow's table.
STORED = {
    1: lambda R: R,
    2: lambda R: R[:, ::-1],
    3: lambda R: R[::-1, ::-1],
    4: lambda R: R[::-1, :],
    5: lambda R: R.transpose(1, 0, 2),
    6: lambda R: R.transpose(1, 0, 2)[::-1, :],  # stored[i, j] = R[j, W-1-i]
    7: lambda R: R.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda R: R.transpose(1, 0, 2)[:, ::-1],  # stored[i, j] = R[H-1-j, i]
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_upright(tmp_path, orientation, fmt):
    # upright: 3 rows x 2 columns of 8x8 blocks, the corner blocks red and blue (no symmetry hides an error)
    rng = np.random.default_rng(orientation)
    blocks = rng.choice([0, 255], size=(3, 2, 3)).astype(np.uint8)
    blocks[0, 0], blocks[2, 1] = RED, BLUE
    upright = blocks.repeat(8, 0).repeat(8, 1)  # 24 x 16
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    kw = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    got = _read(_saved(stored, fmt, exif=exif, **kw), tmp_path)
    assert got.shape == upright.shape
    centres = got[4::8, 4::8]  # JPEG blurs colour edges: compare each block's centre
    assert np.abs(centres - blocks.astype(np.int16)).max() <= (60 if fmt == "JPEG" else 0)
    if fmt != "JPEG":
        assert np.array_equal(got, upright)


# ============================================================================ images: modes and formats

def _transparent_halves(mode: str) -> Image.Image:
    """Left half opaque red, right half fully transparent: over white, red | white."""
    im = _halves((255, 0, 0, 255), (0, 0, 255, 0), mode="RGBA")
    return im if mode == "RGBA" else im.convert(mode)


def _palette_with_index_transparency(fmt: str) -> bytes:
    im = _halves(RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    blue = im.getpixel((7, 0))
    return _saved(im, fmt, transparency=blue)


def _palette_with_alpha_palette() -> bytes:
    """A P PNG whose tRNS gives palette entries partial alpha (Pillow reads it as P + bytes)."""
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (4, 0, 8, 8))
    return _saved(im, "PNG", transparency=bytes([255, 128]))


def _grey16_ramp() -> np.ndarray:
    return np.linspace(0, 65535, 64).reshape(8, 8).round().astype(np.uint16)


def _ramp8() -> np.ndarray:
    g = np.rint(_grey16_ramp() / 65535 * 255).astype(np.int16)
    return np.repeat(g[..., None], 3, axis=2)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE), Image.new("RGB", (8, 8), GREEN)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return _saved(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def _multipage_tiff() -> bytes:
    return _saved(Image.new("RGB", (8, 8), RED), "TIFF", save_all=True,
                  append_images=[Image.new("RGB", (8, 8), BLUE)])


def _cmyk_jpeg() -> bytes:
    return _saved(_halves(RED, BLUE).convert("CMYK"), "JPEG", quality=95)


def _float_tiff(scale: float, offset: float = 0.0) -> bytes:
    return _saved(Image.fromarray((_grey16_ramp() / 65535 * scale + offset).astype(np.float32), "F"), "TIFF")


def _int32_tiff() -> bytes:
    return _saved(Image.fromarray(_grey16_ramp().astype(np.int32), "I"), "TIFF")


HALF = 128  # 50 % alpha over white
# name: (file bytes, the RGB picture expected, largest allowed difference per channel)
CASES = {
    "1 png": (lambda: _saved(_halves(0, 1, mode="1"), "PNG"), lambda: _rgb(BLACK, WHITE), 0),
    "1 bmp": (lambda: _saved(_halves(0, 1, mode="1"), "BMP"), lambda: _rgb(BLACK, WHITE), 0),
    "1 tiff": (lambda: _saved(_halves(0, 1, mode="1"), "TIFF"), lambda: _rgb(BLACK, WHITE), 0),
    "L png": (lambda: _saved(_halves(40, 200, mode="L"), "PNG"), lambda: _rgb((40,) * 3, (200,) * 3), 0),
    "L jpeg": (lambda: _saved(_halves(40, 200, mode="L"), "JPEG", quality=95), lambda: _rgb((40,) * 3, (200,) * 3), 12),
    "L pgm": (lambda: _saved(_halves(40, 200, mode="L"), "PPM"), lambda: _rgb((40,) * 3, (200,) * 3), 0),
    "L png tRNS": (lambda: _saved(_halves(40, 200, mode="L"), "PNG", transparency=200),
                   lambda: _rgb((40,) * 3, WHITE), 0),
    "LA png": (lambda: _saved(_halves((40, 255), (0, 0), mode="LA"), "PNG"), lambda: _rgb((40,) * 3, WHITE), 0),
    "LA png half alpha": (lambda: _saved(Image.new("LA", (8, 8), (0, HALF)), "PNG"),
                          lambda: _rgb((127,) * 3, (127,) * 3), 1),
    "P png": (lambda: _saved(_halves(RED, BLUE).convert("P"), "PNG"), lambda: _rgb(RED, BLUE), 0),
    "P gif": (lambda: _saved(_halves(RED, BLUE), "GIF"), lambda: _rgb(RED, BLUE), 0),
    "P bmp": (lambda: _saved(_halves(RED, BLUE).convert("P"), "BMP"), lambda: _rgb(RED, BLUE), 0),
    "P png transparent index": (lambda: _palette_with_index_transparency("PNG"), lambda: _rgb(RED, WHITE), 0),
    "P gif transparent index": (lambda: _palette_with_index_transparency("GIF"), lambda: _rgb(RED, WHITE), 0),
    "P png alpha palette (tRNS)": (_palette_with_alpha_palette, lambda: _rgb(RED, (127, 127, 255)), 1),
    "RGB png": (lambda: _saved(_halves(RED, BLUE), "PNG"), lambda: _rgb(RED, BLUE), 0),
    "RGB jpeg": (lambda: _saved(_halves(RED, BLUE), "JPEG", quality=95), lambda: _rgb(RED, BLUE), 40),
    "RGB png tRNS": (lambda: _saved(_halves(RED, BLUE), "PNG", transparency=BLUE), lambda: _rgb(RED, WHITE), 0),
    "RGB bmp": (lambda: _saved(_halves(RED, BLUE), "BMP"), lambda: _rgb(RED, BLUE), 0),
    "RGB tiff": (lambda: _saved(_halves(RED, BLUE), "TIFF"), lambda: _rgb(RED, BLUE), 0),
    "RGB ppm": (lambda: _saved(_halves(RED, BLUE), "PPM"), lambda: _rgb(RED, BLUE), 0),
    "RGB tga": (lambda: _saved(_halves(RED, BLUE), "TGA"), lambda: _rgb(RED, BLUE), 0),
    "RGB webp lossless": (lambda: _saved(_halves(RED, BLUE), "WEBP", lossless=True), lambda: _rgb(RED, BLUE), 0),
    "RGB ico": (lambda: _saved(_halves(RED, BLUE, (16, 16)), "ICO", sizes=[(16, 16)]),
                lambda: _rgb(RED, BLUE, (16, 16)), 0),
    "RGB qoi": (lambda: _saved(_halves(RED, BLUE), "QOI"), lambda: _rgb(RED, BLUE), 0),
    "RGBA png": (lambda: _saved(_transparent_halves("RGBA"), "PNG"), lambda: _rgb(RED, WHITE), 0),
    "RGBA png half alpha": (lambda: _saved(Image.new("RGBA", (8, 8), (0, 0, 0, HALF)), "PNG"),
                            lambda: _rgb((127,) * 3, (127,) * 3), 1),
    "RGBA tiff": (lambda: _saved(_transparent_halves("RGBA"), "TIFF"), lambda: _rgb(RED, WHITE), 0),
    "RGBA webp": (lambda: _saved(_transparent_halves("RGBA"), "WEBP", lossless=True), lambda: _rgb(RED, WHITE), 0),
    "RGBA tga": (lambda: _saved(_transparent_halves("RGBA"), "TGA"), lambda: _rgb(RED, WHITE), 0),
    "RGBA gif (becomes P + transparency)": (lambda: _saved(_transparent_halves("RGBA"), "GIF"),
                                            lambda: _rgb(RED, WHITE), 0),
    "CMYK jpeg": (_cmyk_jpeg, lambda: _rgb(RED, BLUE), 40),
    "CMYK tiff": (lambda: _saved(_halves(RED, BLUE).convert("CMYK"), "TIFF"), lambda: _rgb(RED, BLUE), 0),
    "YCbCr jpeg": (lambda: _saved(_halves(RED, BLUE).convert("YCbCr"), "JPEG", quality=95),
                   lambda: _rgb(RED, BLUE), 40),
    "LAB tiff": (lambda: _saved(_halves(RED, BLUE).convert("LAB"), "TIFF"), lambda: _rgb(RED, BLUE), 25),
    "I;16 png ramp": (lambda: _saved(Image.fromarray(_grey16_ramp()), "PNG"), _ramp8, 1),
    "I;16 tiff ramp": (lambda: _saved(Image.fromarray(_grey16_ramp()), "TIFF"), _ramp8, 1),
    "I;16B tiff ramp": (lambda: _saved(Image.frombytes("I;16B", (8, 8), _grey16_ramp().astype(">u2").tobytes()),
                                       "TIFF"), _ramp8, 1),
    "16-bit pgm ramp (opens as I)": (lambda: _saved(Image.fromarray(_grey16_ramp()), "PPM"), _ramp8, 1),
    "I tiff ramp": (_int32_tiff, _ramp8, 1),
    "F tiff 0..1": (lambda: _float_tiff(1.0), _ramp8, 1),
    "F tiff 0..255": (lambda: _float_tiff(255.0), _ramp8, 1),
    "F tiff -1..1 (stretched)": (lambda: _float_tiff(2.0, -1.0), _ramp8, 1),
    "16-bit grey png with tRNS": (
        lambda: _png16(np.array([[1000, 65535]] * 2, np.uint16), 0, extra=_trns16(65535)),
        lambda: np.array([[[4] * 3, [255] * 3]] * 2, np.int16), 1),
    "16-bit RGB png": (lambda: _png16(np.array([[[65535, 0, 0], [0, 0, 32896]]] * 2, np.uint16), 2),
                       lambda: np.array([[RED, (0, 0, 128)]] * 2, np.int16), 1),
    "16-bit RGBA png": (lambda: _png16(np.array([[[65535, 0, 0, 65535], [0, 0, 65535, 0]]] * 2, np.uint16), 6),
                        lambda: np.array([[RED, WHITE]] * 2, np.int16), 1),
    "16-bit LA png": (lambda: _png16(np.array([[[0, 65535], [0, 0]]] * 2, np.uint16), 4),
                      lambda: np.array([[BLACK, WHITE]] * 2, np.int16), 1),
    "animated gif: first frame": (lambda: _animated("GIF"), lambda: _rgb(RED, RED), 0),
    "animated webp: first frame": (lambda: _animated("WEBP"), lambda: _rgb(RED, RED), 0),
    "apng: first frame": (lambda: _animated("PNG"), lambda: _rgb(RED, RED), 0),
    "multi-page tiff: first page": (_multipage_tiff, lambda: _rgb(RED, RED), 0),
}


def _trns16(grey: int) -> bytes:
    data = struct.pack(">H", grey)
    return struct.pack(">I", 2) + b"tRNS" + data + struct.pack(">I", zlib.crc32(b"tRNS" + data))


@pytest.mark.parametrize("case", CASES)
def test_every_mode_and_format_becomes_the_picture_on_white(tmp_path, case):
    make, expected, tolerance = CASES[case]
    got = _read(make(), tmp_path)
    want = expected()
    assert got.shape == want.shape
    if "jpeg" in case:  # lossy: colours bleed a pixel or two across the seam in the middle
        got, want = got[:, [0, 1, 6, 7]], want[:, [0, 1, 6, 7]]
    diff = np.abs(got - want).max()
    assert diff <= tolerance, f"{case}: off by {diff}\ngot {got[0, ::4].tolist()}\nwant {want[0, ::4].tolist()}"


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_converts(mode):
    """Modes no file format in Pillow writes (La, RGBa, HSV, RGBX, ...) still give RGB of the right size."""
    base = Image.new("RGBA", (6, 4), (200, 100, 50, 255))
    im = Image.new(mode, (6, 4)) if mode in ("I", "F") or mode.startswith("I;16") else base.convert(
        "LA" if mode == "La" else "RGBA" if mode in ("RGBa", "PA") else "RGB").convert(mode)
    rgb = predict._to_rgb(im)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "HSV", "YCbCr", "LAB", "CMYK", "P", "PA"):
        assert np.abs(np.asarray(rgb, np.int16)[0, 0] - (200, 100, 50)).max() <= 8, mode


def _linear_rgb_icc() -> bytes:
    """An ICC profile for linear-light RGB (sRGB primaries, gamma 1.0): LittleCMS's sRGB profile
    with its three tone curves pointed at one appended `curv` tag of gamma 1.0."""
    from PIL import ImageCms
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    icc += b"\x00" * (-len(icc) % 4)
    curve = b"curv" + b"\x00" * 4 + struct.pack(">IH", 1, 0x0100) + b"\x00\x00"
    offset = len(icc)
    icc += curve
    for i in range(struct.unpack(">I", icc[128:132])[0]):  # the tag table follows the 128-byte header
        entry = 132 + 12 * i
        if icc[entry:entry + 4] in (b"rTRC", b"gTRC", b"bTRC"):
            icc[entry + 4:entry + 12] = struct.pack(">II", offset, len(curve))
    icc[0:4] = struct.pack(">I", len(icc))
    return bytes(icc)


def test_embedded_icc_profile_is_applied(tmp_path):
    """Pixels move from their embedded profile to sRGB, as viewers show them: linear-light 128 and
    64 are sRGB 188 and 137. A profile that does not fit the image or is not a profile is ignored."""
    from PIL import ImageCms
    im = _halves((128, 64, 255), (0, 255, 64))
    for fmt in ("PNG", "JPEG", "TIFF", "WEBP"):
        kw = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        got = _read(_saved(im, fmt, icc_profile=_linear_rgb_icc(), **kw), tmp_path)
        want = np.array([(188, 137, 255), (0, 255, 137)], np.int16)
        assert np.abs(got[:, [0, 7]] - want).max() <= 3, (fmt, got[0, [0, 7]].tolist())
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = _read(_saved(im, "PNG"), tmp_path)
    assert np.abs(_read(_saved(im, "PNG", icc_profile=srgb), tmp_path) - plain).max() <= 2
    grey = Image.new("L", (4, 4), 128)
    assert (_read(_saved(grey, "PNG", icc_profile=srgb), tmp_path) == 128).all()  # an RGB profile on L
    assert (_read(_saved(grey, "PNG", icc_profile=b"junk" * 40), tmp_path) == 128).all()


# ============================================================================ images: bombs and damage


def _bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height (only one row of data follows)."""
    return _png(width, height, 8, 0, b"\x00" * (width + 1))[:300]


def _bomb_bmp(width: int, height: int) -> bytes:
    blob = bytearray(_saved(Image.new("RGB", (2, 2)), "BMP"))
    blob[18:26] = struct.pack("<ii", width, height)
    return bytes(blob)


def _bomb_gif(width: int, height: int) -> bytes:
    blob = bytearray(_saved(Image.new("P", (2, 2)), "GIF"))
    blob[6:10] = struct.pack("<HH", width, height)
    return bytes(blob)


def _bomb_tiff(width: int, height: int) -> bytes:
    blob = bytearray(_saved(Image.new("L", (2, 2)), "TIFF"))
    # rewrite the ImageWidth (256) and ImageLength (257) entries in place
    offset = struct.unpack("<I", blob[4:8])[0]
    for i in range(struct.unpack("<H", blob[offset:offset + 2])[0]):
        entry = offset + 2 + 12 * i
        tag, kind = struct.unpack("<HH", blob[entry:entry + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            blob[entry + 2:entry + 12] = struct.pack("<HII", 4, 1, value)  # LONG
    return bytes(blob)


BOMBS = {
    "png 20000x10000 (over 2x the limit: Pillow raises)": lambda: _bomb_png(20000, 10000),
    "png 10000x10000 (1x-2x the limit: Pillow only warns)": lambda: _bomb_png(10000, 10000),
    "bmp 30000x30000": lambda: _bomb_bmp(30000, 30000),
    "bmp 10000x10000": lambda: _bomb_bmp(10000, 10000),
    "gif 65535x65535": lambda: _bomb_gif(65535, 65535),
    "gif 65535x1500": lambda: _bomb_gif(65535, 1500),
    "tiff 100000x1000": lambda: _bomb_tiff(100000, 1000),
}


def test_the_issue_bomb_png_is_one_line_exit_2(tmp_path):
    """The issue's case, through the real CLI: ~300 bytes claiming 20000x10000 px."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(20000, 10000))
    assert len(bomb.read_bytes()) <= 300
    proc = run_cli("predict.py", tmp_path / "no_model_needed.pt", bomb, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(bomb) in lines[0] and f"{Image.MAX_IMAGE_PIXELS:,}" in lines[0] and "200,000,000" in lines[0]


@pytest.mark.parametrize("case", BOMBS)
def test_bombs_are_refused_in_one_line(tmp_path, capsys, recwarn, case):
    path = tmp_path / "bomb.img"
    path.write_bytes(BOMBS[case]())
    assert predict.main(["model.pt", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert str(path) in err and f"{Image.MAX_IMAGE_PIXELS:,}" in err and "too large" in err
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_lower_pixel_limit_is_honoured(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    Image.new("RGB", (100, 100), RED).save(path)
    assert predict.read_image(path).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: between 1x and 2x
    with pytest.raises(UserError, match="6,000 pixels"):
        predict.read_image(path)


def _truncate(blob: bytes, keep: float = 0.6) -> bytes:
    return blob[: int(len(blob) * keep)]


def _noisy(size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))


DAMAGED = {
    "empty file": lambda: b"",
    "text": lambda: b"hello, this is not a picture\n",
    "html named .png": lambda: b"<!doctype html><html><body>404</body></html>",
    "truncated png": lambda: _truncate(_saved(_noisy(), "PNG")),
    "truncated jpeg": lambda: _truncate(_saved(_noisy(), "JPEG")),
    "truncated gif": lambda: _truncate(_saved(_noisy().convert("P"), "GIF")),
    "truncated webp": lambda: _truncate(_saved(_noisy(), "WEBP")),
    "truncated tiff": lambda: _truncate(_saved(_noisy(), "TIFF")),
    "truncated bmp": lambda: _truncate(_saved(_noisy(), "BMP")),
    "png header only": lambda: _saved(_noisy(), "PNG")[:40],
    "png with a corrupt IDAT": lambda: _png(8, 8, 8, 2, b"\x00" * 10)[:33] + _garbled_idat(),
    "jpeg header then zeros": lambda: _saved(_noisy(), "JPEG")[:200] + b"\x00" * 500,
}


def _garbled_idat() -> bytes:
    data = b"\x78\x9c" + b"\xff" * 40
    return struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data)) + \
        b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_files_are_refused_in_one_line(tmp_path, capsys, recwarn, case):
    path = tmp_path / "damaged.png"
    path.write_bytes(DAMAGED[case]())
    assert predict.main(["model.pt", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"error: {path} ")
    assert not [str(w.message) for w in recwarn], "Pillow's warnings would print more lines"


def test_fuzzed_files_never_raise_anything_but_user_error(tmp_path):
    """Truncations and flipped bytes of real files: an RGB picture or a UserError, nothing else."""
    rng = np.random.default_rng(1)
    sources = [_saved(_noisy((16, 16)), f) for f in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")]
    sources += [_animated("PNG"), _cmyk_jpeg(), _saved(Image.fromarray(_grey16_ramp()), "PNG")]
    for blob in sources:
        for _ in range(25):
            b = bytearray(blob)
            for pos in rng.integers(0, len(b), size=rng.integers(1, 4)):
                b[pos] = rng.integers(0, 256)
            if rng.random() < 0.3:
                b = b[: rng.integers(1, len(b))]
            try:
                im = predict.read_image(io.BytesIO(bytes(b)), name="fuzz")
            except UserError as e:
                assert "\n" not in str(e) and str(e).startswith("fuzz ")
            else:
                assert im.mode == "RGB"


# ============================================================================ images: the app


def _app_script(root: str) -> None:
    import argparse

    import app
    app.page(argparse.Namespace(root=root))


@pytest.fixture
def stub_model(tmp_path, monkeypatch):
    """A model.pt path the app lists, served by a stub that records what the model gets."""
    path = tmp_path / "exp" / "analysis" / "model.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    seen: list = []
    monkeypatch.setattr(predict, "load_model", lambda p: predict.Model(None, ["cat", "dog"], 32, (0,), (1,), Path(p)))

    def fake_probabilities(model, images):
        import torch
        seen.extend(images)
        return torch.tensor([[0.3, 0.7]] * len(images))
    monkeypatch.setattr(predict, "probabilities", fake_probabilities)
    return tmp_path, seen


def _run_app(root: Path, name: str, blob: bytes):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_function(_app_script, args=(str(root),), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    at.file_uploader[0].set_value((name, blob, "application/octet-stream"))
    at.run()
    return at


def test_app_shows_the_upright_picture_and_predicts_on_it(stub_model, tmp_path, monkeypatch):
    from streamlit.delta_generator import DeltaGenerator
    shown = []
    original = DeltaGenerator.image

    def spy(self, image, *args, **kwargs):
        shown.append(image)
        return original(self, image, *args, **kwargs)
    monkeypatch.setattr(DeltaGenerator, "image", spy)
    root, seen = stub_model
    at = _run_app(root, "phone.jpg", _sideways_phone_jpeg(tmp_path / "phone.jpg").read_bytes())
    assert not at.exception and not at.error, (at.exception, at.error)
    assert at.metric[0].value == "dog" and len(at.image) == 1
    (x,) = seen
    assert x[0, 2:14].float().mean() > 200 and x[2, 18:30].float().mean() > 200  # red on top, blue below
    (picture,) = shown  # what the page shows is the upright RGB picture, not the sideways file
    assert isinstance(picture, Image.Image) and picture.mode == "RGB" and picture.size == (32, 64)
    top = np.asarray(picture)[:24].mean((0, 1))
    assert top[0] > 200 and top[2] < 50


@pytest.mark.parametrize("name, make", [
    ("bomb.png", lambda: _bomb_png(20000, 10000)),
    ("warn.png", lambda: _bomb_png(10000, 10000)),
    ("truncated.jpg", lambda: _truncate(_saved(_noisy(), "JPEG"))),
    ("text.png", lambda: b"not an image"),
])
def test_app_shows_an_error_not_an_exception(stub_model, name, make):
    root, seen = stub_model
    at = _run_app(root, name, make())
    assert not at.exception, at.exception
    assert len(at.error) == 1 and name in at.error[0].value
    assert not seen and not at.metric


@pytest.mark.parametrize("case", ["RGBA png", "I;16 png ramp", "CMYK jpeg", "animated webp: first frame",
                                  "P gif transparent index", "F tiff 0..1"])
def test_app_displays_any_mode(stub_model, case):
    root, seen = stub_model
    at = _run_app(root, "upload.png", CASES[case][0]())
    assert not at.exception and not at.error, (at.exception, at.error)
    assert len(seen) == 1 and at.metric[0].value == "dog"


def test_app_accepts_every_extension_pillow_opens():
    import app
    types = app.image_types()
    for ext in ("png", "apng", "jpg", "jpeg", "gif", "webp", "tif", "tiff", "bmp", "ppm", "pgm", "tga", "ico",
                "qoi", "psd", "jp2"):
        assert ext in types


# ============================================================================ CIFAR-format pickles


N = 100  # one image per class


def _cifar_dict(data_form: str, label_form: str) -> dict:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, size=(N, 3072), dtype=np.uint8)
    fine = rng.permutation(N)
    coarse = fine // 5
    as_labels = {"list": lambda a: [int(v) for v in a], "int64 array": lambda a: a.astype(np.int64),
                 "uint8 array": lambda a: a.astype(np.uint8), "numpy scalars": lambda a: list(a),
                 "tuple": lambda a: tuple(int(v) for v in a), "bytes": lambda a: a.astype(np.uint8).tobytes()}
    as_data = {"uint8 array": lambda a: a, "int64 array": lambda a: a.astype(np.int64),
               "list of lists": lambda a: a.tolist(), "list of bytes": lambda a: [r.tobytes() for r in a],
               "list of arrays": lambda a: list(a), "one bytes blob": lambda a: a.tobytes(),
               "fortran-order array": lambda a: np.asfortranarray(a)}
    return {
        "batch_label": "training batch 1 of 1",
        "data": as_data[data_form](data),
        "fine_labels": as_labels[label_form](fine),
        "coarse_labels": as_labels[label_form](coarse),
        "filenames": [f"img_{i}.png" for i in range(N)],
        # everything else a writer may leave in the dict, harmless
        "extra": {"set": {1, 2}, "frozenset": frozenset({3}), "bytes": b"\x00\xff", "empty": b"",
                  "bytearray": bytearray(b"ab"), "tuple": (1, 2.5, None, True), "complex": 1 + 2j,
                  "ordered": OrderedDict(a=1), "f32": np.float32(1.5), "u8": np.uint8(3), "big": 2 ** 70,
                  "dtype": np.dtype("<f4"), "empty array": np.empty((0, 3)), "unicode": "ü€"},
    }


META = {"fine_label_names": [f"class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"super_{i:02d}" for i in range(20)]}


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: bytes as `str` (STRING/BINSTRING), dict keys as `str`,
    globals under Python 2 / NumPy 1 names (numpy.core, __builtin__, copy_reg)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if self.proto == 0:
            self.write(pickle.STRING + repr(obj)[1:].encode("ascii") + b"\n")
        elif len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_py2_bytearray(self, obj: bytearray) -> None:
        self.save_reduce(bytearray, (obj.decode("latin1"), "latin-1"), obj=obj)  # as Python 2 reduced it

    dispatch[bytearray] = save_py2_bytearray

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        module = {"builtins": "__builtin__", "copyreg": "copy_reg"}.get(module, module)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def _python2_keys(d: dict) -> dict:
    return {k.encode(): v for k, v in d.items()}


def _write_dataset(root: Path, train: dict, writer: str, protocol: int) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in (("train", train), ("meta", META)):
        with open(folder / name, "wb") as f:
            if writer == "python3":
                pickle.dump(obj, f, protocol=protocol)
            else:
                _Python2Pickler(f, protocol=protocol).dump(_python2_keys(obj))
    return folder


def _reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _cifar_dict("uint8 array", "list")
    return d["data"].reshape(N, 3, 32, 32), np.array(d["fine_labels"]), np.array(d["coarse_labels"])


def _check_loads_identically(root: Path) -> None:
    images, fine, coarse = _reference()
    ds = load_cifar100(root, download=False)
    assert ds.train.images.dtype == np.uint8 and ds.train.images.flags.c_contiguous
    assert np.array_equal(ds.train.images, images)
    assert ds.train.fine.dtype == np.int64 and np.array_equal(ds.train.fine, fine)
    assert np.array_equal(ds.train.coarse, coarse)
    assert ds.fine_names == META["fine_label_names"] and ds.coarse_names == META["coarse_label_names"]


def test_the_issue_protocol_2_file_loads(tmp_path):
    """Python 3, pickle.dump(d, f, protocol=2), uint8 array + list labels: refused before the fix."""
    _write_dataset(tmp_path, _cifar_dict("uint8 array", "list"), "python3", 2)
    assert b"_codecs" in (tmp_path / "cifar-100-python/train").read_bytes()
    _check_loads_identically(tmp_path)


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("data_form, label_form", [
    ("uint8 array", "list"), ("uint8 array", "int64 array"), ("uint8 array", "numpy scalars"),
    ("list of lists", "list"), ("list of bytes", "uint8 array"), ("list of arrays", "tuple"),
    ("int64 array", "bytes"), ("one bytes blob", "list"), ("fortran-order array", "int64 array"),
])
def test_python3_pickles_at_every_protocol(tmp_path, protocol, data_form, label_form):
    _write_dataset(tmp_path, _cifar_dict(data_form, label_form), "python3", protocol)
    _check_loads_identically(tmp_path)


@pytest.mark.parametrize("protocol", range(3))
@pytest.mark.parametrize("data_form, label_form", [("uint8 array", "list"), ("list of lists", "list"),
                                                   ("list of bytes", "int64 array"), ("one bytes blob", "bytes")])
def test_python2_pickles(tmp_path, protocol, data_form, label_form):
    folder = _write_dataset(tmp_path, _cifar_dict(data_form, label_form), "python2", protocol)
    blob = (folder / "train").read_bytes()
    if data_form == "uint8 array":
        assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob
    _check_loads_identically(tmp_path)


def test_numpy_names_of_both_majors(tmp_path):
    """The same protocol-3 file naming numpy.core (NumPy 1) or numpy._core (NumPy 2)."""
    for core in ("numpy.core", "numpy._core"):
        folder = tmp_path / core / "cifar-100-python"
        folder.mkdir(parents=True)
        write_pickle(folder / "train", _cifar_dict("uint8 array", "int64 array"), core)
        write_pickle(folder / "meta", META, core)
        _check_loads_identically(tmp_path / core)


def test_names_as_tuple_or_array(tmp_path):
    folder = _write_dataset(tmp_path, _cifar_dict("uint8 array", "list"), "python3", 4)
    meta = {"fine_label_names": np.array(META["fine_label_names"]),
            "coarse_label_names": tuple(META["coarse_label_names"])}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    _check_loads_identically(tmp_path)


@pytest.mark.parametrize("bad, problem", [
    (lambda a: a.astype(np.float64), "float64"),
    (lambda a: (a.astype(np.int64) + 1).tolist(), "0..255"),
    (lambda a: [list(r) for r in a[:, :100]], "3072"),
    (lambda a: a.tolist()[:-1] + [[1, 2]], "rows of different lengths"),
    (lambda a: a.tobytes()[:-1], "bytes"),
])
def test_data_that_is_not_pixels_is_refused(tmp_path, bad, problem):
    d = _cifar_dict("uint8 array", "list")
    d["data"] = bad(d["data"])
    folder = _write_dataset(tmp_path, d, "python3", 2)
    with pytest.raises(UserError, match="'data'") as err:
        load_cifar100(tmp_path, download=False)
    assert str(folder / "train") in str(err.value) and problem in str(err.value)


# ---------------------------------------------------------------------------- malicious pickles


class _Reduce:
    """Pickles as func(*args): what an attacker's __reduce__ returns."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _global(module: str, name: str, protocol: int) -> bytes:
    """Opcodes pushing module.name as protocols 0-3 (GLOBAL) or 4-5 (STACK_GLOBAL) write it."""
    if protocol >= 4:
        def s(x: str) -> bytes:
            return pickle.SHORT_BINUNICODE + bytes([len(x)]) + x.encode()
        return s(module) + s(name) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _call(func: bytes, *args: bytes) -> bytes:
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _str(x: str) -> bytes:
    return pickle.BINUNICODE + struct.pack("<I", len(x.encode())) + x.encode()


def _in_cifar_dict(payload: bytes, protocol: int) -> bytes:
    """A protocol-`protocol` pickle of {"data": <payload>}: the attack sits where the images go."""
    head = pickle.PROTO + bytes([protocol]) if protocol >= 2 else b""
    return head + pickle.EMPTY_DICT + _str("data") + payload + pickle.SETITEM + pickle.STOP


def _touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


ATTACKS = {
    "os.system": lambda m, p: pickle.dumps({"data": _Reduce(os.system, f"touch {m}")}, protocol=p),
    "posix.system": lambda m, p: _in_cifar_dict(_call(_global("posix", "system", p), _str(f"touch {m}")), p),
    "builtins.eval": lambda m, p: pickle.dumps({"data": _Reduce(eval, _touch(m))}, protocol=p),
    "builtins.exec": lambda m, p: pickle.dumps({"data": _Reduce(exec, _touch(m))}, protocol=p),
    "__builtin__.eval": lambda m, p: _in_cifar_dict(_call(_global("__builtin__", "eval", p), _str(_touch(m))), p),
    "getattr(__import__('os'), 'system')": lambda m, p: _in_cifar_dict(_call(
        _call(_global("builtins", "getattr", p), _call(_global("builtins", "__import__", p), _str("os")),
              _str("system")), _str(f"touch {m}")), p),
    "dotted name object.__subclasses__": lambda m, p: _in_cifar_dict(
        _call(_global("builtins", "object.__subclasses__", p)), p),
    "dotted name dict.fromkeys.__self__": lambda m, p: _in_cifar_dict(
        _call(_global("builtins", "dict.__class__", p), _str("x")), p),
    "subprocess.Popen": lambda m, p: _in_cifar_dict(
        _call(_global("subprocess", "Popen", p), _str("touch"), _str(str(m))), p),
    "functools.partial(os.system)": lambda m, p: pickle.dumps(
        {"data": _Reduce(__import__("functools").partial(os.system, f"touch {m}"))}, protocol=p),
    "numpy.testing runstring": lambda m, p: _in_cifar_dict(_call(
        _global("numpy.testing._private.utils", "runstring", p), _str(_touch(m)), pickle.EMPTY_DICT), p),
    "numpy.load (allow_pickle)": lambda m, p: _in_cifar_dict(_call(_global("numpy", "load", p), _str(str(m))), p),
    "numpy.core.multiarray other function": lambda m, p: _in_cifar_dict(
        _call(_global("numpy.core.multiarray", "_vec_string", p)), p),
    "copyreg._reconstructor of subprocess.Popen": lambda m, p: _in_cifar_dict(_call(
        _global("copyreg", "_reconstructor", p), _global("subprocess", "Popen", p),
        _global("builtins", "object", p), _str(f"touch {m}")), p),
    "copy_reg._reconstructor of a numpy dtype": lambda m, p: _in_cifar_dict(_call(
        _global("copy_reg", "_reconstructor", p), _global("numpy", "dtype", p),
        _global("__builtin__", "object", p), pickle.NONE), p),
    "_codecs.encode with a non-text codec": lambda m, p: _in_cifar_dict(_call(
        _global("_codecs", "encode", p), _str("x"), _str("rot13")), p),
    "nested in the filenames list": lambda m, p: pickle.dumps(
        {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0], "coarse_labels": [0],
         "filenames": ["a.png", _Reduce(os.system, f"touch {m}")]}, protocol=p),
    "inside a numpy object array": lambda m, p: pickle.dumps(
        {"data": np.array([_Reduce(os.system, f"touch {m}")], dtype=object)}, protocol=p),
}


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("attack", ATTACKS)
def test_code_is_never_run(tmp_path, attack, protocol):
    folder = _write_dataset(tmp_path, _cifar_dict("uint8 array", "list"), "python3", 2)
    marker = tmp_path / "PWNED"
    (folder / "train").write_bytes(ATTACKS[attack](marker, protocol))
    with pytest.raises(UserError) as err:
        load_cifar100(tmp_path, download=False)
    msg = str(err.value)
    assert msg.startswith("refusing to unpickle ") and str(folder / "train") in msg and "\n" not in msg, msg
    assert not marker.exists()


def test_protocol_5_out_of_band_buffers_are_a_clear_error(tmp_path):
    folder = _write_dataset(tmp_path, _cifar_dict("uint8 array", "list"), "python3", 5)
    d = _cifar_dict("uint8 array", "list")
    buffers: list = []
    (folder / "train").write_bytes(pickle.dumps(d, protocol=5, buffer_callback=buffers.append))
    assert buffers  # the array's bytes are not in the file
    with pytest.raises(UserError, match="corrupt pickle"):
        load_cifar100(tmp_path, download=False)
