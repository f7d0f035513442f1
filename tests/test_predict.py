"""predict.py: top-k of any image file, the same answer evaluate() gave on the test set, clean errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from tests.conftest import run_cli
from tests.fake_cifar import write_fake_cifar

# a model that trains in seconds: random init, 1 epoch per stage, 32 px
TINY_CONFIG = {"backbone": "resnet18", "pretrained": False, "stage1_epochs": 1,
               "stage2_epochs": 1, "input_size": 32, "batch_size": 64, "aug_strength": 0.0}


def make_tiny_model(root: Path) -> tuple[Path, object]:
    """root/tiny/analysis/model.pt trained on fake CIFAR; returns (model path, test Split)."""
    from analysis.final import retrain_and_test
    from trainable.data import prepare_final_data
    data = write_fake_cifar(root / "data", train_per_class=5, test_per_class=2)
    fd = prepare_final_data(data, subset=None, seed=0, download=False)
    out = root / "runs" / "tiny" / "analysis"
    retrain_and_test(TINY_CONFIG, fd, out)
    return out / "model.pt", fd.test


def save_png(array_chw: np.ndarray, path: Path, size: int | None = None) -> Path:
    im = Image.fromarray(np.ascontiguousarray(array_chw.transpose(1, 2, 0)))
    (im.resize((size, size), Image.Resampling.NEAREST) if size else im).save(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model, test = make_tiny_model(root)
    images = [save_png(test.images[i], root / f"test_{i}.png") for i in range(6)]
    big = save_png(test.images[0], root / "big.jpg", size=200)  # any size, any format
    return model, test, images, big, root


def test_prediction_matches_the_test_evaluation(tiny):
    """A 32x32 test image saved as PNG reaches the model as exactly the test set's pixels, so it
    gets the probabilities the test tensor gets, and the class evaluate() predicted for it."""
    model_path, test, images, _, _ = tiny
    expected = torch.load(model_path.parent / "test_predictions.pt", weights_only=True)["predictions"]
    model = predict.load_model(model_path)
    loaded = [predict.to_model_input(predict.read_image(p)) for p in images]
    for i, x in enumerate(loaded):
        assert torch.equal(x, torch.from_numpy(np.ascontiguousarray(test.images[i]))), i
    probs = predict.probabilities(model, loaded)
    direct = predict.probabilities(model, [torch.from_numpy(test.images[i].copy()) for i in range(len(images))])
    assert probs.shape == (len(images), len(model.names))
    assert torch.allclose(probs, direct, atol=1e-6)
    assert probs.argmax(1).tolist() == expected[:len(images)].tolist()


def test_a_batch_that_runs_out_of_memory_is_halved_with_the_same_probabilities(tiny):
    model_path, _, images, _, _ = tiny
    model = predict.load_model(model_path)
    loaded = [predict.to_model_input(predict.read_image(p)) for p in images]
    whole = predict.probabilities(model, loaded)
    real, sizes = model.net, []

    def fits_three(x):  # a device that holds 3 images at a time
        sizes.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)
    model.net = fits_three
    assert torch.allclose(predict.probabilities(model, loaded, batch_size=8), whole, atol=1e-6)
    assert sizes == [6, 3, 3]


def test_cli_prints_top5_per_image(tiny):
    model_path, _, images, big, _ = tiny
    proc = run_cli("predict.py", model_path, images[0], big, timeout=300, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * 6 and lines[0] == str(images[0]) and lines[6] == str(big)
    for block in (lines[1:6], lines[7:12]):
        probs = [float(line.split()[-1].rstrip("%")) / 100 for line in block]
        assert [line.split()[0] for line in block] == ["1.", "2.", "3.", "4.", "5."]
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-3


def test_cli_json(tiny):
    model_path, _, images, _, _ = tiny
    proc = run_cli("predict.py", model_path, *images[:2], "--json", timeout=300, check=True)
    out = json.loads(proc.stdout)
    names = torch.load(model_path, weights_only=True)["fine_names"]
    assert [r["image"] for r in out] == [str(p) for p in images[:2]]
    for r in out:
        assert len(r["top"]) == 5
        assert all(t["class"] in names for t in r["top"])
        assert sum(t["probability"] for t in r["top"]) <= 1 + 1e-6


def test_a_folder_of_images_is_each_image_in_it(tiny, tmp_path):
    """A folder argument is its image files, sorted (other files skipped); one without any is one line."""
    model_path, _, images, _, _ = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, src in enumerate(images[:2]):
        (folder / f"{i}{src.suffix}").write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    out = json.loads(run_cli("predict.py", model_path, folder, images[0], "--json", timeout=300, check=True).stdout)
    assert [r["image"] for r in out] == [str(folder / f"0{images[0].suffix}"), str(folder / f"1{images[1].suffix}"),
                                         str(images[0])]
    proc = run_cli("predict.py", model_path, folder / "sub", timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: folder {folder / 'sub'} holds no image file " \
        "(.png, .jpg, ... as Pillow reads): pass image files or a folder of them"


BAD = ["missing image", "not an image", "missing model", "not a model", "a folder as the model", "a truncated model"]


def _bad_case(tiny, case: str) -> tuple[Path, Path]:
    model_path, _, images, _, root = tiny
    junk = root / "junk.png"
    junk.write_text("not a picture")
    truncated = root / "truncated.pt"
    truncated.write_bytes(model_path.read_bytes()[:5000])
    return {"missing image": (model_path, root / "nope.png"),
            "not an image": (model_path, junk),
            "missing model": (root / "nope.pt", images[0]),
            "not a model": (junk, images[0]),
            "a folder as the model": (model_path.parent, images[0]),
            "a truncated model": (truncated, images[0])}[case]


def _check_bad(case: str, code: int, out: str, err: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    if case == "a folder as the model":
        assert "is a folder, not a model file" in lines[0]
    if case == "a truncated model":
        assert "it is truncated or damaged, or another file; copy it again" in lines[0]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(tiny, case, capsys):
    """In this process (a traceback would fail the test as it would show the user one); the case
    below runs the CLI as a process, for its exit code and a stderr holding only the message."""
    model, image = _bad_case(tiny, case)
    code = predict.main([str(model), str(image)])
    captured = capsys.readouterr()
    _check_bad(case, code, captured.out, captured.err)


def test_bad_input_as_a_process_is_one_line_exit_2(tiny):
    model, image = _bad_case(tiny, "a truncated model")
    proc = run_cli("predict.py", model, image, timeout=300)
    _check_bad("a truncated model", proc.returncode, proc.stdout, proc.stderr)


def test_app_lists_search_and_recipe_models(tmp_path):
    from app import find_models
    paths = [tmp_path / "exp/analysis/model.pt", tmp_path / "exp/analysis/baselines/alexnet_scratch/model.pt",
             tmp_path / "store/exp2/analysis/model.pt"]
    for p in paths:
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
    (tmp_path / "exp/analysis/other.pt").write_bytes(b"")
    assert set(find_models(tmp_path)) == set(paths)
    assert set(find_models(tmp_path / "exp")) == set(paths[:2])
