"""--weights-dir files in the forms users have them: any common wrapper loads the same backbone; a file
that is not this backbone's weights is one line saying what does not fit and how to fix it."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import analyze
from tests.test_writes import TINY, tiny_experiment
from trainable.errors import UserError
from trainable.model import create_model

NAME = "test_efficientnet"  # timm's 0.36 M-parameter test network: same layout as EfficientNet


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """A backbone's weights (random but fixed), classifier included, as timm.create_model has them."""
    torch.manual_seed(0)
    return timm.create_model(NAME).state_dict()


def _body(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _averaged(state: dict) -> dict:  # torch.optim.swa_utils.AveragedModel(model).state_dict()
    return {**_prefixed("module.", state), "n_averaged": torch.tensor(3)}


def _our_model_pt(state: dict) -> dict:  # analyze.py's model.pt: Net = backbone + our heads
    return {"state_dict": {**_prefixed("backbone.", _body(state)), "fine_head.weight": torch.zeros(100, 8),
                           "fine_head.bias": torch.zeros(100)}, "config": {"backbone": NAME}}


FORMS = {
    "plain state_dict": lambda s: s,
    "DataParallel / DDP (module.)": lambda s: _prefixed("module.", s),
    "torch.compile of DDP (_orig_mod.module.)": lambda s: _prefixed("_orig_mod.module.", s),
    "a wrapper's model.": lambda s: _prefixed("model.", s),
    "a wrapper's backbone.": lambda s: _prefixed("backbone.", s),
    "Lightning checkpoint": lambda s: {"state_dict": _prefixed("model.", s), "epoch": 3, "global_step": 10,
                                       "optimizer_states": [{"state": {}}], "hyper_parameters": {"lr": 0.1}},
    "model_state_dict + optimizer": lambda s: {"model_state_dict": s, "optimizer_state_dict": {"state": {}},
                                               "epoch": 7, "loss": 0.5},
    "{'model': ...}": lambda s: {"model": s},
    "{'ema': ...}": lambda s: {"ema": s, "step": 100},
    "timm train.py checkpoint (args Namespace, EMA first)": lambda s: {
        "epoch": 9, "arch": NAME, "state_dict": {k: torch.zeros_like(v) for k, v in s.items()},
        "state_dict_ema": _prefixed("module.", s), "optimizer": {"state": {}}, "args": argparse.Namespace(lr=0.1),
        "metric": np.float64(0.71), "version": 2},
    "AveragedModel (module. + n_averaged)": _averaged,
    "PyTorch ImageNet example (a tensor metric beside it)": lambda s: {"model_state_dict": s,
                                                                      "best_acc1": torch.tensor(0.7)},
    "classifier of another size": lambda s: {**_body(s), "classifier.weight": torch.zeros(10, 32),
                                             "classifier.bias": torch.zeros(10)},
    "no classifier (saved after reset_classifier(0))": _body,
    "analyze.py's own model.pt": _our_model_pt,
}


def _load(folder: Path) -> dict:
    return create_model(NAME, pretrained=True, weights_dir=str(folder)).backbone.state_dict()


def _same_body(got: dict, reference: dict) -> bool:
    return all(torch.equal(got[k], v) for k, v in _body(reference).items())


@pytest.mark.parametrize("form", FORMS)
def test_every_common_wrapper_loads_the_same_backbone(tmp_path, reference, form):
    torch.save(FORMS[form](reference), tmp_path / f"{NAME}.pth")
    assert _same_body(_load(tmp_path), reference)


@pytest.mark.parametrize("filename", [f"{NAME}.safetensors", f"{NAME}.pt", f"{NAME}.bin", f"{NAME}.pth.tar",
                                      f"{NAME}/model.safetensors", f"{NAME}/pytorch_model.bin"])
def test_other_file_names_and_safetensors(tmp_path, reference, filename):
    path = tmp_path / filename
    path.parent.mkdir(exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in reference.items()}, str(path))
    else:
        torch.save(reference, path)
    assert _same_body(_load(tmp_path), reference)


def _pickled_model(s):
    model = timm.create_model(NAME)
    model.load_state_dict(s)
    return model


BAD = {
    "another architecture": (lambda s: timm.create_model("test_resnet").state_dict(),
                             ["does not fit backbone test_efficientnet", "missing (conv_stem.weight", "unknown to it"]),
    "a body tensor of another shape": (lambda s: {**s, "conv_stem.weight": torch.zeros(4, 3, 3, 3)},
                                       ["1 of other shapes (conv_stem.weight [4, 3, 3, 3] vs [", "file vs model"]),
    "half the tensors": (lambda s: dict(list(s.items())[: len(s) // 2]), ["tensors missing", "torch.save(model.state_dict()"]),
    # a bigger sibling's weights (lite1's saved as lite0's): every tensor fits, and more of the same modules
    "a deeper model of the same family": (lambda s: {**s, "blocks.9.0.conv.weight": torch.zeros(8, 8, 1, 1)},
                                          ["1 tensors unknown to it (blocks.9.0.conv.weight)", "another model's weights"]),
    "a whole pickled model": (_pickled_model, ["holds Python objects", "weights_only=False).state_dict()"]),
    "no tensors at all": (lambda s: {"epoch": 3, "note": "hello"}, ["holds no state_dict"]),
}


@pytest.mark.parametrize("case", BAD)
def test_a_file_that_does_not_fit_is_one_line_saying_why(tmp_path, reference, case):
    make, words = BAD[case]
    torch.save(make(reference), tmp_path / f"{NAME}.pth")
    with pytest.raises(UserError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / f"{NAME}.pth") in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("blob, words", [(b"", "cannot be read"), (b"garbage" * 20, "cannot be read"),
                                         ("truncated", "truncated or not a weights file")])
def test_an_unreadable_file_is_one_line(tmp_path, reference, blob, words):
    path = tmp_path / f"{NAME}.pth"
    if blob == "truncated":
        torch.save(reference, path)
        blob = path.read_bytes()[:2000]
    path.write_bytes(blob)
    with pytest.raises(UserError, match=words) as e:
        _load(tmp_path)
    assert "\n" not in str(e.value)


def test_a_file_given_as_the_folder_is_one_line(tmp_path, reference):
    torch.save(reference, tmp_path / f"{NAME}.pth")
    with pytest.raises(UserError, match="is a file: pass the folder holding it"):
        create_model(NAME, pretrained=True, weights_dir=str(tmp_path / f"{NAME}.pth"))


def test_a_folder_named_as_the_weights_file_is_called_a_folder(tmp_path):
    (tmp_path / f"{NAME}.pth").mkdir()  # e.g. an archive extracted into a folder of the file's name
    with pytest.raises(UserError, match=rf"{NAME}.pth is a folder, not a weights file: put the file {NAME}.pth"):
        create_model(NAME, pretrained=True, weights_dir=str(tmp_path))


def test_the_issue_dataparallel_file_through_analyze(tmp_path, reference, capsys, one_thread):
    """The issue's example through a CLI: analyze.py --weights-dir holding a DataParallel save
    retrains from those weights (a file that does not fit stops it in one line, exit 2)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(_prefixed("module.", reference), weights / f"{NAME}.pth")
    exp = tiny_experiment(tmp_path, {**TINY, "pretrained": True})
    torch.save(timm.create_model("test_resnet").state_dict(), weights / f"{NAME}.pth")
    assert analyze.main([str(exp), "--weights-dir", str(weights)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit backbone test_efficientnet" in err[0], err
    torch.save(_prefixed("module.", reference), weights / f"{NAME}.pth")
    assert analyze.main([str(exp), "--weights-dir", str(weights)]) == 0
    assert (exp / "analysis" / "model.pt").is_file()


def test_the_issue_file_with_the_real_weights(tmp_path):
    """The offline EfficientNet-Lite0 weights saved from nn.DataParallel load as saved plainly."""
    from tests.conftest import WEIGHTS
    from tests.fake_cifar import missing
    name = "tf_efficientnet_lite0"
    if not (WEIGHTS / f"{name}.pth").is_file():
        missing(f"{WEIGHTS / name}.pth")
    plain = create_model(name, pretrained=True, weights_dir=str(WEIGHTS)).backbone.state_dict()
    wrapped = torch.nn.DataParallel(timm.create_model(name))
    wrapped.module.load_state_dict(torch.load(WEIGHTS / f"{name}.pth", weights_only=True))
    torch.save(wrapped.state_dict(), tmp_path / f"{name}.pth")
    got = create_model(name, pretrained=True, weights_dir=str(tmp_path)).backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in plain.items())
