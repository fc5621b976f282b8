"""The sectioned training config: ``--key value`` overrides parsed by tyro (types, choices,
unknown keys), JSON round trips (and the flat files of earlier versions), the CLI's argument
split, and the help that tyro builds from the fields' comments."""

import dataclasses
import inspect
import json
import subprocess
import sys
import typing

import pytest

from spcl_fast.data import NORMALIZE_MODES
from spcl_fast.methods import METHODS
from spcl_fast.run import config as cfgmod
from spcl_fast.run.config import SECTIONS, TrainConfig, apply_overrides
from spcl_fast.run.presets import PRESETS, smoke
from spcl_fast.train.__main__ import parse_args


def test_overrides_parse_types_and_reject_unknown_keys():
    c = apply_overrides(
        smoke(),
        {"steps": "7", "ratio-range": "0.3,0.7", "probe": "yes", "data_root": "none", "lr": "2e-4"},
    )
    assert c.optim.steps == 7 and c.spcl.ratio_range == (0.3, 0.7) and c.run.probe is True
    assert c.data.data_root is None and c.optim.lr == 2e-4
    assert c.model == smoke().model  # the rest as it was
    with pytest.raises(ValueError, match="did you mean --steps"):
        apply_overrides(smoke(), {"stepz": "3"})
    with pytest.raises(ValueError, match="cannot parse"):
        apply_overrides(smoke(), {"steps": "many"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.steps = 3


@pytest.mark.parametrize("overrides, message", [
    ({"normalize": "bogus"}, "normalize must be one of dataset, image, equalize, none"),
    ({"negatives": "foo"}, "negatives must be one of cross, all"),
    ({"method": "byol"}, "method must be one of spcl, mae, dino, simclr"),
    ({"ratio-range": "0.5"}, "--ratio-range takes 2 values"),
    ({"compile": "maybe"}, "--compile: cannot parse 'maybe' as bool"),
    ({"dino_out_dim": "x"}, "--dino-out-dim: cannot parse 'x' as int"),
    ({"modle": "vit"}, "did you mean --model"),
])
def test_overrides_name_the_bad_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(smoke(), overrides)


def test_flags_reach_their_sections_under_any_spelling():
    c = apply_overrides(smoke(), {"model": "vit_small_patch16", "dino-local-crops": "3",
                                  "dino_out_dim": "64", "class_token": "on", "extra": '{"a": 1}',
                                  "method": "dino", "precision": "bf16", "depth": "none"})
    assert c.model.name == "vit_small_patch16" and c.model.class_token and c.model.depth is None
    assert (c.dino.num_local, c.dino.out_dim, c.method) == (3, 64, "dino")
    assert c.run.extra == {"a": 1} and c.optim.precision == "bf16"
    assert c.method_section is c.dino
    assert c.replace(steps=5, keep=0.5).optim.steps == 5
    with pytest.raises(ValueError, match="unknown option --stepz"):
        c.replace(stepz=5)


def test_config_json_round_trip_and_flat_files_of_earlier_versions():
    c = apply_overrides(smoke(), {"ratio_range": "0.2 0.8", "dino_local_crops": "4"})
    text = c.to_json()
    assert set(json.loads(text)) == {"method", *SECTIONS}
    assert TrainConfig.from_dict(json.loads(text)) == c
    flat = json.loads(json.dumps(c.flat()))  # what versions before the sections wrote
    assert TrainConfig.from_dict(flat) == c
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match=r"unknown config keys \['optim.nope'\]"):
        TrainConfig.from_dict({"optim": {"nope": 1}})
    assert TrainConfig.from_dict({"nope": 1, "steps": 3}, strict=False).optim.steps == 3


def test_every_field_has_a_comment_and_presets_build():
    for section in SECTIONS:
        cls = type(getattr(TrainConfig(), section))
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            line = next(ln for ln in src.splitlines() if ln.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"config field {section}.{f.name} has no comment"
    for preset in PRESETS.values():
        config = preset()
        assert isinstance(config, TrainConfig)
        config.check()


def test_choice_fields_match_what_the_code_accepts():
    assert typing.get_args(cfgmod.Normalize) == NORMALIZE_MODES
    assert typing.get_args(cfgmod.Method) == tuple(METHODS) == SECTIONS[2:6]
    assert set(cfgmod.FIELDS) >= {"model", "dino_local_crops", "steps", "image_size"}


def test_check_names_the_setting():
    with pytest.raises(ValueError, match="keep must be in"):
        smoke().replace(keep=1.5).check()
    with pytest.raises(ValueError, match="num_subsets must be from 2 to the number of patches"):
        smoke().replace(num_subsets=17).check()  # 32 px / patch 8: 16 patches
    smoke().replace(num_subsets=16).check()


def test_parse_args():
    preset, over, resume = parse_args(["--preset", "smoke", "--steps=3", "--resume"])
    assert (preset, over, resume) == ("smoke", {"steps": "3"}, "")
    assert parse_args(["--compile", "--steps", "2"])[1] == {"compile": "true", "steps": "2"}
    with pytest.raises(SystemExit):
        parse_args(["--preset", "nope"])
    with pytest.raises(SystemExit):
        parse_args(["steps", "3"])


def test_help_lists_every_flag_with_its_comment():
    proc = subprocess.run([sys.executable, "-m", "spcl_fast.train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--preset NAME" in proc.stdout and "smoke" in proc.stdout
    for flag in ("--image-size", "--dino-local-crops", "--model", "--steps", "--extra"):
        assert flag in proc.stdout, flag
    assert "InfoNCE temperature" in proc.stdout and "{dataset,image,equalize,none}" in proc.stdout
