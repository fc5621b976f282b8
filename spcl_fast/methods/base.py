"""The contract every pre-training method keeps, so the training engine needs nothing else.

A method is an ``nn.Module`` built around the encoder (``model.encoder``), named by its class
attribute ``label`` in logs, that offers:

* ``sample_plan(batch_size, generator, device, images=None) -> plan``: the step's randomness
  drawn on the host (partitions, masks, crops); ``images`` only for plans that depend on the
  pixels (S-PCL's background skipping). A plan is a frozen dataclass with ``num_images``,
  ``to(device)`` and a classmethod ``concat(plans)`` that joins the plans of consecutive image
  ranges (the engine draws one per RNG stream and joins them).
* ``forward(images, generator=None, plan=None) -> dict``: a differentiable scalar ``loss`` and
  detached scalars worth logging (the engine averages them over micro-steps and processes).
* ``train_flops(plan) -> int``: algorithmic FLOPs of one training step on ``plan`` (count the
  encoder with ``encoder.forward_flops``, the rest with :mod:`spcl_fast.flops`).
* ``Config``: its settings, a frozen dataclass in its own module (one commented field per
  setting: the field's ``--flag``, its comment the flag's help; ``check(num_patches=None)``
  raising one ``ValueError`` naming a setting no run can use, through
  :func:`spcl_fast.sections.require`). The training config collects these sections from
  :data:`~spcl_fast.methods.METHODS`: each is one section of ``TrainConfig`` and of
  ``config.json``, named as the method.
* ``__init__(encoder, config=None, context=None)``: the method built from its ``Config``
  (``None``: the defaults), checked there, and the run's :class:`BuildContext`;
  ``from_config(encoder, settings, context)``, a classmethod, does so from the section as a
  dict of fields.
* optionally ``after_step(step)``: called after every optimizer step (:class:`AfterStep`;
  DINO's centre and teacher EMA).
* a loss that couples the images of a batch (in-batch negatives, batch statistics) splits the
  forward pass in two (:class:`BatchLoss`): ``forward(images, plan=plan, embed_only=True)``
  returns the step's per-image outputs (every parameter acts here) and ``batch_loss(embedded)``
  the loss over them, so gradient accumulation stays exact (S-PCL, SimCLR). A loss that is a
  mean of per-image terms needs neither (MAE; DINO's batch centre moves in ``after_step``).

Adding a method ``foo``:

1. ``spcl_fast/methods/foo.py``: its ``FooConfig`` section, the module (``Config = FooConfig``,
   built from it), its plan class, ``from_config``; what it shares with other methods (crops,
   heads, patches, loss terms) comes from below (:mod:`spcl_fast.views`,
   :mod:`spcl_fast.nn.heads`, :mod:`spcl_fast.methods.losses`), never from another method;
   collectives through :mod:`spcl_fast.collectives`.
2. ``METHODS["foo"] = Foo`` in ``spcl_fast/methods/__init__.py``.

``--method foo`` then trains it, its fields are flags (in a help section of their own), its
section is saved in ``config.json`` and compared on resume; nothing in ``spcl_fast/run`` or
``spcl_fast/train`` changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class BuildContext:
    """What a method may need from the run beyond its own section.

    Attributes:
        total_steps: optimizer steps of the run (for schedules inside the method).
        gather_distributed: a contrastive loss should see every process's batch.
    """

    total_steps: int | None = None
    gather_distributed: bool = False


class Plan(Protocol):
    """A step's randomness for ``num_images`` images (see the module docstring)."""

    @property
    def num_images(self) -> int: ...

    def to(self, device: torch.device | str) -> Plan: ...

    @classmethod
    def concat(cls, plans: list) -> Plan: ...


@runtime_checkable
class Method(Protocol):
    """The training contract of the module docstring."""

    encoder: torch.nn.Module
    label: str  # the method's name in logs and plots ("S-PCL")
    Config: type  # its settings: a frozen dataclass with check(num_patches=None)

    def sample_plan(self, batch_size: int, generator: torch.Generator | None, device,
                    images: torch.Tensor | None = None) -> Plan: ...

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                plan: Plan | None = None) -> dict[str, torch.Tensor]: ...

    def train_flops(self, plan: Plan) -> int: ...

    @classmethod
    def from_config(cls, encoder: torch.nn.Module, settings: Mapping[str, Any],
                    context: BuildContext) -> Method: ...


@runtime_checkable
class AfterStep(Protocol):
    """A method with work after each optimizer step (``step``: the 0-based step just done)."""

    def after_step(self, step: int) -> None: ...


@runtime_checkable
class BatchLoss(Protocol):
    """A method whose loss couples the images of a batch, split so the trainer accumulates
    micro-batches exactly (GradCache, Gao et al., 2021): it embeds every micro-batch without a
    graph (``forward(..., embed_only=True)``), computes ``batch_loss`` over all of them at once
    and backpropagates, then runs each micro-batch again with a graph and backpropagates its
    share of the embeddings' gradient (replaying the RNG, so the second pass draws what the
    first did).

    ``forward(images, generator, plan, embed_only=True)`` returns a dict of tensors whose dim 0
    runs over the images in order; micro-batches' tensors are joined with ``torch.cat`` on dim
    0, padded with zeros (``False``) where they differ in a later dim, so padding must mean
    "absent" to ``batch_loss``. ``batch_loss(embedded)`` has no parameters and returns what
    ``forward`` does (``loss`` and detached numbers); ``forward`` without ``embed_only`` is
    ``batch_loss`` of its embedding.
    """

    def batch_loss(self, embedded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
