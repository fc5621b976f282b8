"""Methods own their settings: each method's config section lives in its module, the training
config collects the sections from the registry (so adding a method is one module and one
registry line), the model and the config validate alike, and no two sections share a flag."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spcl_fast.methods import METHODS
from spcl_fast.run import config as cfgmod
from spcl_fast.run.presets import smoke


def test_sections_are_the_methods_own():
    for name, method in METHODS.items():
        assert cfgmod._SECTION_CLASS[name] is method.Config
        assert method.Config.__module__ == method.__module__  # declared beside the method
    config = smoke()
    assert config.method_section is config.spcl


def test_a_flag_two_sections_would_share_is_refused(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Clash:
        steps: int = 1  # the optim section's flag already

    monkeypatch.setattr(cfgmod, "SECTIONS", (*cfgmod.SECTIONS, "clash"))
    monkeypatch.setitem(cfgmod._SECTION_CLASS, "clash", Clash)
    with pytest.raises(TypeError, match=r"--steps would be both clash.steps and optim.steps"):
        cfgmod._index()


TOY = '''
import dataclasses, json, sys
import torch
from spcl_fast import methods
from spcl_fast.methods.mae import sample_mask
from spcl_fast.sections import require

@dataclasses.dataclass(frozen=True)
class ToyConfig:
    toy_ratio: float = 0.5  # toy: fraction of patches hidden

    def check(self, num_patches=None):
        require(self, {"toy_ratio": (0 <= self.toy_ratio < 1, "in [0, 1)")})

class Toy(torch.nn.Module):
    label = "Toy"
    Config = ToyConfig

    def __init__(self, encoder, config=None, context=None):
        super().__init__()
        self.config = ToyConfig() if config is None else config
        self.config.check(encoder.num_patches)
        self.encoder = encoder

    @classmethod
    def from_config(cls, encoder, settings, context):
        return cls(encoder, ToyConfig(**settings), context)

    def sample_plan(self, batch_size, generator, device, images=None):
        return sample_mask(batch_size, self.encoder.num_patches, self.config.toy_ratio,
                           generator, device)

    def train_flops(self, plan):
        return 1

    def forward(self, images, generator=None, plan=None):
        return {"loss": self.encoder(images).square().mean()}

methods.METHODS["toy"] = Toy  # the one registry line

from spcl_fast.run.config import TrainConfig, apply_overrides, print_help
from spcl_fast.run.model import build_model
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train

config = apply_overrides(smoke(), {"method": "toy", "toy-ratio": "0.25", "probe": "no"})
config.check()
assert config.toy == ToyConfig(0.25) and config.method_section is config.toy
assert TrainConfig.from_dict(json.loads(config.to_json())) == config
assert type(build_model(config)) is Toy
try:
    config.replace(toy_ratio=2.0).check()
except ValueError as e:
    assert str(e) == "toy_ratio must be in [0, 1), got 2.0", e
else:
    raise AssertionError("toy_ratio 2.0 passed the check")
summary = train(config, sys.argv[1])
assert summary["steps"] == config.optim.steps, summary
print_help(config, "train")
'''


def test_adding_a_method_is_one_module_and_one_registry_line(tmp_path):
    """A method defined outside the package and registered before the training config is
    imported gets its section, its flags, its help group, config.json and a training run,
    with nothing in spcl_fast/run or spcl_fast/train changed."""
    script = tmp_path / "toy.py"
    script.write_text(textwrap.dedent(TOY))
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's spcl_fast
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy options" in proc.stdout and "--toy-ratio" in proc.stdout
    assert "toy: fraction of patches hidden" in proc.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "toy" and saved["toy"] == {"toy_ratio": 0.25}
