"""S-PCL's negative control ``pair_across``: the contrastive term pairs each image's first
subset with the other subsets of the previous image, written out here on the embeddings; it
refuses what it cannot be, and trains through the CLI."""

import pytest
import torch

from spcl_fast.methods import SPCL, SPCLConfig
from spcl_fast.nn import vit_tiny_patch16
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train


def _model(**options) -> SPCL:
    torch.manual_seed(0)
    enc = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    return SPCL(enc, SPCLConfig(proj_hidden=16, proj_dim=8, **options))


@pytest.mark.parametrize("options", [{}, {"num_subsets": 3}, {"negatives": "all"},
                                     {"predictor_hidden": 8}, {"vicreg_var": 1.0}])
def test_the_control_is_the_loss_of_subsets_taken_from_the_previous_image(options):
    control, plain = _model(pair_across=True, **options), _model(**options)
    plain.load_state_dict(control.state_dict())
    images = torch.rand(5, 1, 32, 32)
    plan = control.sample_plan(5, torch.Generator().manual_seed(1), "cpu", images)
    embedded = control(images, plan=plan, embed_only=True)
    got = control.batch_loss(embedded)
    z = embedded["z"]
    shifted = torch.stack([z[:, 0], *[z[[4, 0, 1, 2, 3], k] for k in range(1, z.shape[1])]], 1)
    # the first subset's queries are its own (a predictor's too); only the targets move
    queries = embedded.get("queries", z[:, :-1])
    want = plain.batch_loss({**embedded, "z": shifted, "queries": queries})
    torch.testing.assert_close(got["loss"], want["loss"])
    grad, = torch.autograd.grad(got["loss"], z, retain_graph=True)
    want_grad, = torch.autograd.grad(want["loss"], z)
    torch.testing.assert_close(grad, want_grad)
    # the pairs really are across images: not the plain loss
    assert not torch.allclose(got["loss"], plain.batch_loss(embedded)["loss"])


def test_the_control_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="pair_across must be False with same_patient"):
        SPCLConfig(pair_across=True, same_patient="exclude").check()
    model = _model(pair_across=True)
    images = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="pair_across needs at least 2 images"):
        model(images, plan=model.sample_plan(1, None, "cpu", images))


def test_the_control_trains_from_the_command_line_config(tmp_path):
    summary = train(smoke().replace(steps=2, pair_across=True, accum_steps=2, probe=False),
                    tmp_path / "run")
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
