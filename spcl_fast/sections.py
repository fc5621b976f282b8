"""What every config section shares: a frozen dataclass whose fields are ``--flag`` options
(one commented field each; the comment is the flag's help), with a ``check()`` that raises one
``ValueError`` naming the first setting no run can use.

* :func:`flag`: a field whose ``--flag`` (and key in flat config files) is not its name
  (``num_local: Annotated[int, flag("dino_local_crops")] = 10``).
* :func:`require`: the ``check()`` of a section: every ``Literal`` field holds one of its
  choices (config files are not parsed by the CLI), then the section's own range rules.

The training config (:mod:`spcl_fast.run.config`) holds the data, model, optimizer and run
sections; each method declares its own section in its module (``SPCLConfig`` in
:mod:`spcl_fast.methods.spcl`...).

Example::

    >>> from dataclasses import dataclass
    >>> from typing import Literal
    >>> @dataclass(frozen=True)
    ... class Toy:
    ...     size: int = 1  # side in pixels
    ...     mode: Literal["a", "b"] = "a"  # how
    ...     def check(self):
    ...         require(self, {"size": (self.size >= 1, ">= 1")})
    >>> Toy(size=0).check()
    Traceback (most recent call last):
    ...
    ValueError: size must be >= 1, got 0
    >>> Toy(mode="c").check()
    Traceback (most recent call last):
    ...
    ValueError: mode must be one of a, b, got 'c'
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import tyro


def flag(name: str):
    """The annotation of a field whose ``--flag`` (and flat config key) is ``name``."""
    return tyro.conf.arg(name=name)


def _choices(hint) -> tuple | None:
    """The values a ``Literal`` type (optionally ``Annotated``) allows, else ``None``."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def require(section, rules: dict[str, tuple[bool, str]]) -> None:
    """Raise ``ValueError("<name> must be <what>, got <value>")`` for the first ``Literal``
    field of ``section`` outside its choices, then for the first broken rule of ``rules``
    (``{field: (ok, what it must be)}``)."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    for f in dataclasses.fields(section):
        allowed = _choices(hints[f.name])
        value = getattr(section, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, allowed))}, "
                             f"got {value!r}")
    for name, (ok, want) in rules.items():
        if not ok:
            raise ValueError(f"{name} must be {want}, got {getattr(section, name)!r}")
