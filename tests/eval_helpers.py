"""Shared fixtures of the evaluation, export and viz tests: a tiny spcl_fast checkpoint written
without training (the loaders only need its format) and a tiny dataset with masks."""

from __future__ import annotations

import dataclasses

import torch

from spcl_fast.run.checkpoint import save_checkpoint
from spcl_fast.run.config import TrainConfig
from spcl_fast.run.model import build_model

TINY = dict(embed_dim=32, depth=2, num_heads=2, image_size=32, patch_size=8, proj_hidden=32,
            proj_dim=16, normalize="image", probe=False)


def write_run(folder, step: int = 3, stats=None,
              **changes) -> tuple[str, TrainConfig, torch.nn.Module]:
    """A run folder with ``config.json`` and ``ckpt-<step>.pt`` as the engine writes them
    (with ``intensity_stats`` when ``stats`` is given); the weights are perturbed from the init
    so a loader that re-initialises would be caught."""
    config = TrainConfig().replace(**{**TINY, **changes})
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.to_json())
    state = {"model": model.state_dict(), "config": dataclasses.asdict(config), "step": step}
    if stats is not None:
        state["intensity_stats"] = list(stats)
    save_checkpoint(state, folder, step)
    return str(folder), config, model


class Squares(torch.utils.data.Dataset):
    """Images with a bright patch-aligned square (mask = the square) on a noisy background;
    every third image is empty. Follows the data contract, with ``"mask"`` (1, S, S)."""

    class_names = ("square",)

    def __init__(self, n: int, size: int = 32, seed: int = 0, patch: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.images = 0.2 + 0.1 * torch.rand(n, 1, size, size, generator=g)
        self.masks = torch.zeros(n, 1, size, size)
        cells = size // patch
        for i in range(n):
            if i % 3 == 2:
                continue
            r, c = torch.randint(0, cells - 1, (2,), generator=g).tolist()
            self.masks[i, 0, r * patch:(r + 2) * patch, c * patch:(c + 1) * patch] = 1
        self.images = (self.images + 0.6 * self.masks).clamp(0, 1)
        self.labels = self.masks.flatten(1).amax(1, keepdim=True)
        self.ids = [f"sq-{seed}-{i}" for i in range(n)]
        self.patient_ids = None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"image": self.images[i], "labels": self.labels[i], "mask": self.masks[i],
                "id": self.ids[i]}
