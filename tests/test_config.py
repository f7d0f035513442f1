"""Tests for trainable/config.py (TrialConfig) and planning/settings.py (flags and --config YAML)."""
from __future__ import annotations

import dataclasses

import pytest

from planning.settings import (
    SearchSettings,
    build_parser,
    load_yaml_settings,
    parse_settings,
)
from trainable.config import OPTIMIZERS, SCHEDULES, TrialConfig, coerce
from trainable.errors import UserError


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# --- TrialConfig.from_dict -----------------------------------------------------------------------

def test_defaults():
    cfg = TrialConfig.from_dict({})
    assert cfg == TrialConfig()
    assert cfg.backbone == "tf_efficientnet_lite0" and cfg.total_epochs == 3


def test_coerces_strings():
    cfg = TrialConfig.from_dict({"batch_size": "256", "freeze_bn": "true", "pretrained": "off",
                                 "stage1_lr": "3e-2", "stage3_epochs": "4",
                                 "compile": "Yes", "backbone": "resnet18", "unfreeze_depth": 3.0})
    assert cfg.batch_size == 256 and isinstance(cfg.batch_size, int)
    assert cfg.freeze_bn is True and cfg.pretrained is False and cfg.compile is True
    assert cfg.stage1_lr == 0.03 and isinstance(cfg.stage1_lr, float)
    assert cfg.stage3_epochs == 4 and cfg.unfreeze_depth == 3
    assert isinstance(cfg.unfreeze_depth, int)


def test_int_for_float_field():
    cfg = TrialConfig.from_dict({"layer_decay": 1, "weight_decay": 0})
    assert cfg.layer_decay == 1.0 and isinstance(cfg.layer_decay, float)


def test_unknown_keys():
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict({"batch_size": 64, "lr": 0.1, "bogus": 1})
    msg = _one_line(e)
    assert "unknown hyper-parameter(s) bogus, lr" in msg
    with pytest.raises(UserError, match=r"unknown hyper-parameter\(s\) 1, 2: valid ones"):  # YAML's int keys
        TrialConfig.from_dict({1: 64, 2: 0.1})


@pytest.mark.parametrize("d", [[1, 2], "batch_size", 3, None])
def test_a_config_that_is_no_mapping_is_one_line(d):
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict(d)
    assert _one_line(e).startswith("a trial config is a mapping of hyper-parameter: value, not a ")


@pytest.mark.parametrize("key, value, fragment", [
    ("batch_size", "big", "batch_size='big' is not a valid int"),
    ("batch_size", 2.5, "batch_size=2.5 is not a valid int"),  # not silently 2
    ("stage1_epochs", "1.5", "stage1_epochs='1.5' is not a valid int"),
    ("freeze_bn", "maybe", "freeze_bn='maybe' is not a valid bool"),
    ("stage1_lr", "fast", "stage1_lr='fast' is not a valid float"),
    ("stage1_lr", None, "stage1_lr=None is not a valid float"),
    ("weights_dir", None, "weights_dir=None is not a valid str"),  # not the folder "None"
    ("stage1_epochs", float("inf"), "stage1_epochs=inf is not a valid int"),
])
def test_uncoercible_values(key, value, fragment):
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict({key: value})
    assert fragment in _one_line(e)


@pytest.mark.parametrize("d, fragment", [
    ({"unfreeze_depth": 0}, "unfreeze_depth must be >= 1"),
    ({"stage1_epochs": -1}, "stage epochs must be >= 0"),
    ({"stage1_epochs": 0, "stage2_epochs": 0}, "the stage plan has no epochs: give some stage epochs >= 1"),
    ({"head": "tree"}, "head must be one of flat, coarse_to_fine"),
    ({"backbone_lr_scale": 0}, "backbone_lr_scale must be > 0"),
    ({"plateau_patience": 2}, "plateau_patience needs schedule=constant (cosine and onecycle decay the lr themselves)"),
    ({"plateau_patience": 2, "schedule": "constant", "plateau_factor": 1.0}, "plateau_factor must be in (0, 1)"),
    ({"early_stop_patience": -1}, "patiences must be >= 0 (0 = off)"),
    ({"stage2_lr": 0}, "learning rates must be > 0"),
    ({"stage2_lr": "nan"}, "stage2_lr must be a finite number, not nan"),
    # every float field, whatever its range check: inf (or 1e400) passes "> 0"
    ({"stage1_lr": "inf"}, "stage1_lr must be a finite number, not inf"),
    ({"stage3_lr": 1e400}, "stage3_lr must be a finite number, not inf"),
    ({"weight_decay": "inf"}, "weight_decay must be a finite number, not inf"),
    ({"mixup_alpha": float("inf")}, "mixup_alpha must be a finite number, not inf"),
    ({"layer_decay": 0}, "layer_decay must be in (0, 1]"),
    ({"layer_decay": 1.5}, "layer_decay must be in (0, 1]"),
    ({"schedule": "linear"}, f"schedule must be one of {', '.join(SCHEDULES)}"),
    ({"optimizer": "adam"}, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
    ({"batch_size": 0}, "batch_size 0 is too small (BatchNorm can't train on one image): use 2 or more"),
    ({"batch_size": 1}, "batch_size 1 is too small (BatchNorm can't train on one image): use 2 or more"),
    ({"eval_batch_size": 0}, "eval_batch_size 0 must be >= 1"),
    # timm's Mixup asserts an even batch in every step of every trial
    ({"batch_size": 33, "mixup_alpha": 0.2}, "mixup/cutmix need an even batch_size: use 32 or 34, not 33"),
    ({"batch_size": 3, "cutmix_alpha": 1.0}, "mixup/cutmix need an even batch_size: use 2 or 4, not 3"),
    ({"batch_size": "129", "mixup_alpha": "0.1", "cutmix_alpha": "0.5"},
     "mixup/cutmix need an even batch_size: use 128 or 130, not 129"),
    ({"weight_decay": -1e-4}, "weight_decay and coarse_loss_weight must be >= 0"),
    ({"coarse_loss_weight": "nan"}, "coarse_loss_weight must be a finite number, not nan"),
    ({"mixup_alpha": -0.2}, "mixup_alpha and cutmix_alpha must be >= 0"),
    ({"input_size": 8}, "input_size must be in [16, 512]"),
    ({"input_size": 1024}, "input_size must be in [16, 512]"),
    ({"aug_strength": 1.5}, "aug_strength must be in [0, 1]"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
    ({"warmup_frac": 1.0}, "warmup_frac must be in [0, 1)"),
])
def test_invalid_values(d, fragment):
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict(d)
    assert _one_line(e) == f"bad trial config: {fragment}"


@pytest.mark.parametrize("d", [
    {"batch_size": 33},  # an odd batch without mixup/cutmix trains
    {"batch_size": 2, "mixup_alpha": 0.2},
    {"batch_size": 34, "mixup_alpha": 0.2, "cutmix_alpha": 1.0},
    {"batch_size": 33, "mixup_alpha": 0.0, "cutmix_alpha": 0.0},
    {"eval_batch_size": 1},  # evaluation has no mixup and BatchNorm in eval mode
    {"eval_batch_size": 333},
])
def test_valid_batch_sizes(d):
    assert TrialConfig.from_dict(d).batch_size == int(d.get("batch_size", 128))


def test_round_trip():
    d = {"backbone": "resnet18", "stage3_epochs": 2, "stage3_lr": 2e-4,
         "layer_decay": 0.6, "head": "coarse_to_fine", "input_size": 64, "schedule": "onecycle",
         "augment": "flip,rotate=10,blur=0.1", "early_stop_patience": 3, "small_input_stem": True}
    cfg = TrialConfig.from_dict(d)
    out = cfg.to_dict()
    assert set(out) == {f.name for f in dataclasses.fields(TrialConfig)}
    assert {k: out[k] for k in d} == d
    assert TrialConfig.from_dict(out) == cfg
    # a string-typed dict (as from --set or a hand-written YAML) gives the same config
    assert TrialConfig.from_dict({k: str(v) for k, v in out.items()}) == cfg


@pytest.mark.parametrize("d, total", [
    ({}, 3),
    ({"stage1_epochs": 2, "stage2_epochs": 5}, 7),
    ({"stage3_epochs": 9}, 12),  # the plan is the stage epochs: a stage 3 of 9
    ({"stage1_epochs": 2, "stage2_epochs": 5, "stage3_epochs": 4}, 11),
])
def test_total_epochs(d, total):
    assert TrialConfig.from_dict(d).total_epochs == total


def test_a_bad_augment_list_is_a_config_error():
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict({"augment": "flip,spin=3"})
    assert _one_line(e).startswith("bad trial config: ") and "spin" in _one_line(e)


def test_coerce_is_typing_only():
    # no range checks: a partial --set dict can name a field another one must agree with
    assert coerce({"stage3_epochs": "3", "head": "flat"}) == {"stage3_epochs": 3, "head": "flat"}
    for unknown in ({"nope": 1}, {"stages": 3}):  # the plan's shape is its stage epochs, not a field of its own
        with pytest.raises(UserError, match="unknown hyper-parameter"):
            coerce(unknown)


# --- SearchSettings flags ------------------------------------------------------------------------

def test_every_field_is_a_flag():
    parser = build_parser("x")
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(SearchSettings):
        assert "--" + f.name.replace("_", "-") in flags


def test_defaults_match_the_dataclass():
    s = parse_settings([])
    assert s == SearchSettings()
    assert s.num_samples is None and s.gpus is None and s.scheduler == "asha" and s.set is None
    assert s.fixed() == {}


def test_flags_parse_to_typed_fields():
    s = parse_settings(["--gpus-per-trial", "0.5", "--gpus", "2", "--cpus-per-trial", "3",
                        "--num-samples", "8", "--max-epochs", "4", "--space", "tiny",
                        "--backbones", "resnet18,mobilenetv2_100", "--compile", "--no-pretrained",
                        "--set", "batch_size=256", "--set", "freeze_bn = true",
                        "--subset", "50", "--val-fraction", "0.2", "--scheduler", "fifo",
                        "--storage-path", "/tmp/r", "--name", "exp1", "--resume"])
    assert s.gpus_per_trial == 0.5 and isinstance(s.gpus_per_trial, float)
    assert s.gpus == 2 and s.cpus_per_trial == 3 and s.num_samples == 8 and s.max_epochs == 4
    assert s.space == "tiny" and s.backbones == "resnet18,mobilenetv2_100"
    assert s.compile is True and s.no_pretrained is True and s.resume is True
    assert s.list_spaces is False
    assert s.set == ["batch_size=256", "freeze_bn = true"]
    assert s.fixed() == {"batch_size": 256, "freeze_bn": True}
    assert s.subset == 50 and s.val_fraction == 0.2 and s.scheduler == "fifo"
    assert s.storage_path == "/tmp/r" and s.name == "exp1"


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_settings(["--num-samples", "many"])
    assert e.value.code == 2
    assert "--num-samples: invalid int value: 'many'" in capsys.readouterr().err


def test_set_splits_at_the_first_equals_sign_and_types_the_value():
    s = SearchSettings(set=["batch_size=256", "stage1_lr = 1e-3", "augment=flip,rotate=15"])
    assert s.fixed() == {"batch_size": 256, "stage1_lr": 1e-3, "augment": "flip,rotate=15"}
    assert SearchSettings(set=["augment="]).fixed() == {"augment": ""}  # an empty value is a value
    for bad in ("novalue", "=5"):
        with pytest.raises(UserError) as e:
            SearchSettings(set=[bad]).fixed()
        assert f"--set {bad!r} is not KEY=VALUE" in _one_line(e)


# --- --config YAML -------------------------------------------------------------------------------

def _yaml(tmp_path, text: str):
    p = tmp_path / "settings.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_sets_defaults_and_flags_win(tmp_path):
    cfg = _yaml(tmp_path, "num-samples: 5\nspace: tiny\ngpus_per_trial: 1\ncompile: true\n"
                          "max_epochs: 3\nset: [batch_size=32, stage1_lr=0.01]\n")
    s = parse_settings(["--config", cfg])
    assert s.num_samples == 5 and s.space == "tiny" and s.compile is True and s.max_epochs == 3
    assert s.gpus_per_trial == 1.0 and isinstance(s.gpus_per_trial, float)
    assert s.fixed() == {"batch_size": 32, "stage1_lr": 0.01}
    s = parse_settings(["--num-samples", "9", "--config", cfg, "--space", "default",
                        "--set", "batch_size=64"])
    assert s.num_samples == 9 and s.space == "default" and s.max_epochs == 3
    assert s.fixed() == {"batch_size": 64, "stage1_lr": 0.01}  # the flag's value wins
    assert s.config == cfg


def test_yaml_set_as_one_string_or_a_mapping(tmp_path):
    s = parse_settings(["--config", _yaml(tmp_path, "set: batch_size=32\n")])
    assert s.fixed() == {"batch_size": 32}
    s = parse_settings(["--config", _yaml(tmp_path, "set: {batch_size: 32, head: coarse_to_fine}\n")])
    assert s.fixed() == {"batch_size": 32, "head": "coarse_to_fine"}


def test_empty_yaml_changes_nothing(tmp_path):
    assert load_yaml_settings(_yaml(tmp_path, "# nothing\n")) == {}
    assert parse_settings(["--config", _yaml(tmp_path, "")]).num_samples is None


@pytest.mark.parametrize("text, fragment", [
    ("num_samples: 4\nbogus_key: 1\n", "'bogus_key' is not a setting"),
    ("config: other.yaml\n", "'config' is not a setting"),
    ("num_samples: [4\n", "is not valid YAML at line"),
    ("- num_samples\n- 4\n", "must be a mapping of option: value, not list"),
    ("just a string\n", "must be a mapping of option: value, not str"),
    ("num_samples: many\n", "'num_samples' must be an int, not 'many'"),
    ("num_samples: [1, 2]\n", "'num_samples' must be an int, not [1, 2]"),
    ("num_samples: 2.5\n", "'num_samples' must be an int, not 2.5"),
    ("compile: 'false'\n", "'compile' must be true or false, not 'false'"),  # not a truthy string
    ("set: [{batch_size: 3}]\n", "'set' must be a list of KEY=VALUE strings or a mapping"),
    ("val_fraction: high\n", "'val_fraction' must be a float, not 'high'"),
])
def test_bad_yaml(tmp_path, text, fragment):
    path = _yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        parse_settings(["--config", path])
    msg = _one_line(e)
    assert msg.startswith(f"--config {path}") and fragment in msg


def test_missing_yaml(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError) as e:
        parse_settings(["--config", path])
    assert _one_line(e).startswith(f"cannot read --config {path}: No such file or directory")
