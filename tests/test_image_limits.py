"""Images Pillow's safety limits refuse though they are intact open as a viewer shows them (within the
decompression-bomb guard), and a file that is refused is refused for its precise reason."""
from __future__ import annotations

import importlib.util
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import predict
from tests.test_inputs import _bomb_png, _linear_rgb_icc, _run_app, _saved, stub_model  # noqa: F401 - a fixture
from trainable.errors import UserError

BIG = 3 << 20  # inflated bytes: three times Pillow's MAX_TEXT_CHUNK (1 MiB)


def _big_linear_icc() -> bytes:
    """The linear-light RGB profile padded to 3 MiB (zeros no tag points at): a valid profile a
    printer-profile-sized ICC would be, that inflates past MAX_TEXT_CHUNK in a PNG's iCCP chunk."""
    icc = bytearray(_linear_rgb_icc())
    icc += b"\0" * (BIG - len(icc))
    icc[0:4] = struct.pack(">I", len(icc))
    return bytes(icc)


def _halves() -> Image.Image:
    im = Image.new("RGB", (8, 8), (128, 64, 255))
    im.paste((0, 255, 64), (4, 0, 8, 8))
    return im


def _text(kind: str, size: int = BIG, count: int = 1) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for i in range(count):
        if kind == "iTXt":
            info.add_itxt(f"XML:com.adobe.xmp{i or ''}", "x" * size, zip=True)
        else:
            info.add_text(f"comment{i}", "x" * size, zip=kind == "zTXt")
    return info


def _pillow_refuses(blob: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
    except ValueError as e:
        return "MAX_TEXT" in str(e)
    return False


OVERSIZE = {
    "iCCP past MAX_TEXT_CHUNK (the issue's example)": lambda: _saved(_halves(), "PNG", icc_profile=_big_linear_icc()),
    "zTXt past MAX_TEXT_CHUNK": lambda: _saved(_halves(), "PNG", pnginfo=_text("zTXt")),
    "iTXt (XMP) past MAX_TEXT_CHUNK": lambda: _saved(_halves(), "PNG", pnginfo=_text("iTXt")),
    "text past MAX_TEXT_MEMORY": lambda: _saved(_halves(), "PNG", pnginfo=_text("zTXt", 1 << 20, count=66)),
    "an ICC that inflates to 100 MB (kept out)": lambda: _saved(_halves(), "PNG", icc_profile=b"\0" * (100 << 20)),
    "big text and the big ICC": lambda: _saved(_halves(), "PNG", icc_profile=_big_linear_icc(),
                                               pnginfo=_text("zTXt")),
}


@pytest.mark.parametrize("case", OVERSIZE)
def test_png_metadata_past_pillows_limits_opens_as_a_viewer_shows_it(case):
    blob = OVERSIZE[case]()
    assert _pillow_refuses(blob), "Pillow itself opens it: the case tests nothing"
    got = np.asarray(predict.read_image(io.BytesIO(blob), name="meta.png"), dtype=np.int16)
    want = [(188, 137, 255), (0, 255, 137)] if "big ICC" in case or "issue" in case else [(128, 64, 255),
                                                                                           (0, 255, 64)]
    assert np.abs(got[:, [0, 7]] - np.array(want)).max() <= 3, got[0, [0, 7]].tolist()  # the ICC applied


def test_the_issue_png_through_predict_and_the_app(tmp_path, stub_model, capsys):  # noqa: F811
    path = tmp_path / "scan.png"
    path.write_bytes(OVERSIZE["iCCP past MAX_TEXT_CHUNK (the issue's example)"]())
    assert predict.main(["model.pt", str(path)]) == 0  # the stub model of test_inputs
    assert "dog" in capsys.readouterr().out
    root, seen = stub_model
    at = _run_app(root, "scan.png", path.read_bytes())
    assert not at.exception and not at.error, (at.exception, at.error)
    assert at.metric[0].value == "dog"


def test_the_pixel_guard_still_holds_with_big_metadata():
    """A bomb with oversize metadata is still refused as a bomb, with its pixel count."""
    bomb = bytearray(_bomb_png(20000, 10000))
    text = b"comment\0\0" + zlib.compress(b"x" * BIG)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    blob = bytes(bomb[:33]) + chunk + bytes(bomb[33:])  # after the IHDR
    with pytest.raises(UserError, match=r"200,000,000 pixels, over the limit"):
        predict.read_image(io.BytesIO(blob), name="bomb.png")


def _isobmff(brand: bytes) -> bytes:
    return struct.pack(">I", 24) + b"ftyp" + brand + b"\0\0\0\0" + b"mif1" + brand + b"\0" * 64


REFUSED = {
    "empty file": (lambda: b"", "is an empty file (0 bytes)"),
    "HEIC from a phone, no pillow-heif": (lambda: _isobmff(b"heic"), "HEIC/HEIF photo"),
    "an SVG": (lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG drawing"),
    "a PDF": (lambda: b"%PDF-1.7\n%\xe2\xe3\n1 0 obj", "PDF document"),
    "an MP4 video": (lambda: _isobmff(b"isom"), "video or other ISO media file"),
    "JPEG XL": (lambda: b"\xff\x0a" + b"\0" * 40, "JPEG XL image"),
    "text": (lambda: b"hello, not a picture", "its first bytes match no image format"),
    "truncated jpeg": (lambda: _saved(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:700],
                       "is truncated (the file ends before its image data does)"),
    "corrupt png": (lambda: _saved(_halves(), "PNG")[:-30] + b"\0" * 30, "is corrupt"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_file_says_precisely_why(tmp_path, capsys, case):
    make, words = REFUSED[case]
    path = tmp_path / "upload.img"
    path.write_bytes(make())
    if case.startswith("HEIC") and importlib.util.find_spec("pillow_heif"):
        pytest.skip("pillow-heif is installed here: the message is for environments without it")
    assert predict.main(["model.pt", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path} ") and words in err, err


@pytest.mark.parametrize("make, size", [
    (lambda: _saved(_halves().convert("RGBA"), "PNG", exif=_exif(6, 60000)), (8, 8)),  # big EXIF, rotated
    (lambda: _saved(_halves(), "JPEG", exif=_exif(6, 60000), icc_profile=_big_linear_icc()[:60000]), (8, 8)),
    (lambda: _saved(_halves(), "JPEG", icc_profile=_big_linear_icc()), (8, 8)),  # 3 MB ICC over 48 APP2 markers
])
def test_big_exif_and_icc_in_other_formats(make, size):
    assert predict.read_image(io.BytesIO(make()), name="x").size == size


def _exif(orientation: int, comment_bytes: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = "d" * comment_bytes  # ImageDescription
    return exif
