"""What a training run is set to: one frozen dataclass per section, parsed by tyro.

:class:`TrainConfig` holds the sections ``data`` and ``model``, one section per method of
:data:`spcl_fast.methods.METHODS` (``spcl``, ``mae``, ``dino``, ``simclr``: each method
declares its own, ``SPCLConfig`` in :mod:`spcl_fast.methods.spcl`...), ``optim`` and ``run``
(plus ``method``, which names the section of the method trained). Every field is one
``--key value`` flag, without its section's prefix (``--image-size``, ``--steps``; dashes or
underscores), its comment the flag's help; no two sections share a flag. Choice fields are
``Literal`` types, so the parser, the help and the type checker all know the choices; the
ranges no type can express are checked by each section's ``check()``
(:mod:`spcl_fast.sections`).

``config.json`` holds the sections as nested objects; :meth:`TrainConfig.from_dict` also reads
the flat files earlier versions wrote (one object of flag names).

Adding a setting: a field with a comment in its section, a rule in that section's ``check`` if
it has a range. Adding a method (and so its section): see :mod:`spcl_fast.methods.base`.

Example::

    >>> from spcl_fast.run.presets import demo
    >>> cfg = demo()
    >>> cfg.model.name, cfg.model.embed_dim, cfg.optim.batch_size, cfg.spcl.keep
    ('vit_tiny_patch16', 192, 64, 0.5)
    >>> cfg = apply_overrides(cfg, {"steps": "10", "ratio-range": "0.3,0.7"})
    >>> cfg.optim.steps, cfg.spcl.ratio_range
    (10, (0.3, 0.7))
    >>> TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from ..methods import METHODS
from ..sections import flag, require

Normalize = Literal["dataset", "image", "equalize", "none"]
Precision = Literal["fp32", "bf16", "fp16"]
PatchNorm = Literal["none", "standardize", "standardize+stats"]
Method = Literal[tuple(METHODS)]  # the names --method takes


_JSON = tyro.constructors.PrimitiveConstructorSpec(
    nargs=1, metavar="JSON", instance_from_str=lambda args: json.loads(args[0]),
    is_instance=lambda x: isinstance(x, dict), str_from_instance=lambda x: [json.dumps(x)],
)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # synthetic, a dataset of spcl_fast.data, or a pool: name+name
    data_root: str | None = None  # dataset folder (real datasets); a pool: one per dataset, a,b
    image_size: int = 64  # images are square, image_size x image_size pixels
    data_cache: str | None = None  # cache folder (python -m spcl_fast.data.prepare); pool: a,b
    num_images: int | None = None  # use only the first N training images (None: all)
    num_workers: int = 2  # DataLoader worker processes for real datasets
    normalize: Normalize = "dataset"  # input intensity normalisation
    batch_grouping: Literal["random", "similar"] = "random"  # similar: look-alike batches
    group_grid: int = 1  # similar: thumbnail side that decides look-alikes (1: mean brightness)

    def check(self) -> None:
        require(self, {"image_size": (self.image_size >= 1, ">= 1"),
                        "num_workers": (self.num_workers >= 0, ">= 0"),
                        "group_grid": (1 <= self.group_grid <= self.image_size,
                                       "from 1 to image_size")})


@dataclass(frozen=True)
class ModelConfig:
    name: Annotated[str, flag("model")] = "vit_tiny_patch16"  # encoder preset (spcl_fast.nn)
    patch_size: int = 8  # patch side in pixels; tokens per image = (image_size / patch_size)^2
    embed_dim: int | None = None  # override the preset's width
    depth: int | None = None  # override the preset's number of blocks
    num_heads: int | None = None  # override the preset's number of heads
    pos_embed: Literal["sincos", "learned", "none"] = "sincos"  # position embeddings
    class_token: bool = False  # a learned [CLS]-like token per image/subset pools, not the mean
    patch_norm: PatchNorm = "none"  # per-patch input norm (+stats: mean/std as extra inputs)
    impl: Literal["auto", "triton", "torch"] = "auto"  # kernel implementation

    def check(self) -> None:
        require(self, {
            "patch_size": (self.patch_size >= 1, ">= 1"),
            **{k: (getattr(self, k) is None or getattr(self, k) >= 1, ">= 1")
               for k in ("embed_dim", "depth", "num_heads")},
        })


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 64  # images per optimizer step, over processes and accumulation steps
    accum_steps: int = 1  # micro-batches per optimizer step (the same step as one batch)
    steps: int = 200  # optimizer steps in total
    lr: float = 1e-3  # peak learning rate (after warmup)
    lr_base_batch: int = 0  # scale lr and min_lr by batch_size / lr_base_batch (0: as given)
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    weight_decay: float = 0.05  # AdamW decay, not on norms, biases, position embeddings
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    precision: Precision = "fp32"  # bf16: autocast; fp16: autocast and a gradient scaler
    compile: bool = False  # torch.compile the model (the first steps pay for compilation)
    fsdp: bool = False  # shard weights, gradients, optimizer over processes (FSDP2), not DDP
    plan_shards: int = 0  # partition RNG streams, one per data shard (0: one per process)

    def check(self) -> None:
        require(self, {
            "steps": (self.steps >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "accum_steps": (self.accum_steps >= 1, ">= 1"),
            "lr": (math.isfinite(self.lr) and self.lr > 0, "positive and finite"),
            "min_lr": (math.isfinite(self.min_lr) and self.min_lr >= 0, ">= 0 and finite"),
            "lr_base_batch": (self.lr_base_batch >= 0, ">= 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "weight_decay": (math.isfinite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            "grad_clip": (self.grad_clip >= 0, ">= 0 (0: off)"),
            "max_bad_steps": (self.max_bad_steps >= 1, ">= 1"),
            "plan_shards": (self.plan_shards >= 0, ">= 0"),
        })


@dataclass(frozen=True)
class RunConfig:
    device: str = "auto"  # cpu | cuda | cuda:N | auto (cuda when available)
    seed: int = 0  # seeds the model init, data order and partitions
    deterministic: bool = False  # torch deterministic algorithms (bitwise reruns; slower on GPU)
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    log_every: int = 5  # steps between metric lines in metrics.jsonl
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept in the run folder (the newest ones)
    peak_tflops: float | None = None  # device peak TFLOP/s for MFU (None: from the device name)
    tensorboard: bool = False  # also write TensorBoard scalars (when tensorboard is installed)
    out: str = ""  # output folder ('' picks runs/<preset>-<time>)
    probe: bool = True  # linear-probe the encoder at the end against its initialisation
    probe_steps: int = 300  # optimizer steps of each logistic-regression probe fit
    extra: Annotated[dict, _JSON] = field(default_factory=dict)  # free-form notes (JSON)

    def check(self) -> None:
        require(self, {"threads": (self.threads is None or self.threads >= 1,
                                   ">= 1 (none: torch's default)"),
                        "log_every": (self.log_every >= 1, ">= 1"),
                        "save_every": (self.save_every >= 0, ">= 0 (0: only at the end)"),
                        "keep_last": (self.keep_last >= 1, ">= 1")})


class _TrainConfig:
    """What :class:`TrainConfig` does (it is made below from its sections, the methods' taken
    from :data:`~spcl_fast.methods.METHODS`)."""

    @property
    def method_section(self):
        """The settings of the method trained (``config.spcl`` for S-PCL...)."""
        return getattr(self, self.method)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting no run can use (the data stream
        checks the batch arithmetic against the processes)."""
        patches = max(1, self.data.image_size // self.model.patch_size) ** 2
        for name in SECTIONS:
            if name in METHODS:  # a method's section knows the patches per image
                getattr(self, name).check(patches)
            else:
                getattr(self, name).check()

    def replace(self, **changes) -> TrainConfig:
        """A copy with fields changed by flag name (``steps=3``) or whole sections
        (``optim=OptimConfig(...)``)."""
        by_section: dict[str, dict] = {}
        top = {}
        for key, value in changes.items():
            if key == "method" or (key in SECTIONS and dataclasses.is_dataclass(value)):
                top[key] = value
                continue
            if key not in FIELDS:
                raise ValueError(_unknown(key))
            section, name = FIELDS[key]
            by_section.setdefault(section, {})[name] = value
        for section, values in by_section.items():
            top[section] = dataclasses.replace(top.get(section, getattr(self, section)), **values)
        return dataclasses.replace(self, **top)

    def flat(self) -> dict:
        """``{flag name: value}`` of every field (the shape of pre-section config files)."""
        out = {"method": self.method}
        for key, (section, name) in FIELDS.items():
            out[key] = getattr(getattr(self, section), name)
        return out

    def differences(self, other: TrainConfig) -> list[str]:
        """``["<flag> <mine> (now <other's>)", ...]``: the settings ``other`` changes, leaving
        out one that cannot change a run: the thumbnail side of look-alike batches
        (``group_grid``) when both group at random."""
        mine, theirs = self.flat(), other.flat()
        random = mine["batch_grouping"] == theirs["batch_grouping"] == "random"
        return [f"{k} {mine[k]!r} (now {theirs[k]!r})" for k in theirs
                if mine[k] != theirs[k] and not (random and k == "group_grid")]

    def to_json(self) -> str:
        """The sections as nested JSON objects (tuples become lists)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> TrainConfig:
        """A config from a loaded ``to_json()`` or a flat file of earlier versions. Unknown keys
        raise ``ValueError`` (``strict=False``: ignored, for files of newer versions)."""
        flat = {}
        for key, value in d.items():
            if key in SECTIONS and isinstance(value, dict):
                for name, v in value.items():
                    flat[_FLAG_OF.get((key, name), f"{key}.{name}")] = v
            else:
                flat[key] = value
        unknown = sorted(k for k in flat if k not in FIELDS and k != "method")
        if unknown and strict:
            raise ValueError(f"unknown config keys {unknown}")
        known = {k: _coerce_loaded(v, FLAG_TYPES[k]) for k, v in flat.items()
                 if k in FIELDS or k == "method"}
        return cls().replace(**known)


def _section(cls: type) -> tuple[type, dataclasses.Field]:
    return cls, field(default_factory=cls)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [
        ("method", Annotated[Method, tyro.conf.arg(
            help="pre-training method; its settings are the section of that name")],
         field(default="spcl")),
        ("data", *_section(DataConfig)),
        ("model", *_section(ModelConfig)),
        *((name, *_section(method.Config)) for name, method in METHODS.items()),
        ("optim", *_section(OptimConfig)),
        ("run", *_section(RunConfig)),
    ],
    bases=(_TrainConfig,),
    frozen=True,
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = """Every setting of a training run, by section; frozen, JSON round-trippable.

``config.replace(steps=10, keep=0.5)`` changes fields by their flag names (whatever their
section), ``config.flat()`` lists them so, :meth:`check` rejects settings no run can use.
Presets are in :mod:`spcl_fast.run.presets`. Its sections are ``method`` (a name of
:data:`~spcl_fast.methods.METHODS`), ``data``, ``model``, one per method (each method's
``Config``, named as the method), ``optim`` and ``run``.
"""

SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "method")
_SECTION_CLASS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _flag_name(hint, name: str) -> str:
    for meta in getattr(hint, "__metadata__", ()):
        if isinstance(getattr(meta, "name", None), str):
            return meta.name
    return name


def _index() -> tuple[dict[str, tuple[str, str]], dict[str, object]]:
    """``{flag: (section, field)}`` and ``{flag: type}`` over every section; a flag two
    sections would share is a ``TypeError`` (at import: rename one with ``flag(...)``)."""
    fields, types_ = {}, {"method": Method}
    for section in SECTIONS:
        hints = typing.get_type_hints(_SECTION_CLASS[section], include_extras=True)
        for f in dataclasses.fields(_SECTION_CLASS[section]):
            hint = hints[f.name]
            name = _flag_name(hint, f.name)
            if name in fields or name == "method":
                raise TypeError(f"--{name} would be both {section}.{f.name} and "
                                f"{'.'.join(fields.get(name, ('', 'method'))).lstrip('.')}: "
                                f"give one its own flag name (spcl_fast.sections.flag)")
            fields[name] = (section, f.name)
            types_[name] = typing.get_args(hint)[0] if hasattr(hint, "__metadata__") else hint
    return fields, types_


FIELDS, FLAG_TYPES = _index()
_FLAG_OF = {where: name for name, where in FIELDS.items()}


def _unknown(key: str) -> str:
    names = [*FIELDS, "method"]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=3)
    flags = ", ".join("--" + c.replace("_", "-") for c in close)
    return f"unknown option --{key}" + (f"; did you mean {flags}?" if close else "")


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce_loaded(value, tp):
    base, _ = _strip_optional(tp)
    if value is not None and typing.get_origin(base) is tuple:
        return tuple(value)
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag_values(key: str) -> int:
    """How many words ``--key`` takes on a command line: 2 for a pair (``--betas 0.9 0.99``,
    also written ``0.9,0.99``), else 1 (an unknown key: 1, refused later)."""
    tp = FLAG_TYPES.get(key.replace("-", "_"))
    base, _ = _strip_optional(tp)
    return len(typing.get_args(base)) if typing.get_origin(base) is tuple else 1


def _tyro_args(key: str, text: str) -> list[str]:
    """One ``--key text`` override in tyro's spelling: ``none`` for optional fields, yes/no
    words for booleans, ``a,b`` for pairs (the forms this CLI has always taken)."""
    flag = key.replace("-", "_")
    if flag not in FLAG_TYPES:
        raise ValueError(_unknown(key))
    base, optional = _strip_optional(FLAG_TYPES[flag])
    words = [text]
    if optional and text.lower() in ("none", "null"):
        words = ["None"]
    elif base is bool and text.lower() in _TRUE + _FALSE:
        words = ["True" if text.lower() in _TRUE else "False"]
    elif typing.get_origin(base) is tuple:
        words = [p for p in text.replace(",", " ").split() if p]
        if len(words) != len(typing.get_args(base)):
            raise ValueError(f"--{flag.replace('_', '-')} takes {len(typing.get_args(base))} "
                             f"values ('a b' or 'a,b'), got {text!r}")
    return [f"--{flag.replace('_', '-')}", *words]


def _cli_type():
    return tyro.conf.OmitArgPrefixes[tyro.conf.FlagConversionOff[TrainConfig]]


def _parse_error(key: str, text: str) -> str:
    flag = key.replace("-", "_")
    base, _ = _strip_optional(FLAG_TYPES[flag])
    if typing.get_origin(base) is Literal:
        return f"{flag} must be one of {', '.join(typing.get_args(base))}, got {text!r}"
    kind = getattr(base, "__name__", str(base))
    return f"--{flag.replace('_', '-')}: cannot parse {text!r} as {kind}"


def apply_overrides(config: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Return ``config`` with ``--key value`` strings parsed (by tyro) and applied.

    Args:
        config: the config to start from (not modified: it is frozen).
        overrides: ``{key: text}``; keys are flag names with dashes or underscores, texts are
            parsed into the field's type (``"none"`` for optional fields, ``"yes"``/``"no"``
            for booleans, ``"a,b"`` for pairs, JSON for ``extra``).

    Returns:
        a new :class:`TrainConfig`.

    Raises:
        ValueError: an unknown key (naming the closest flags) or a text that does not parse.

    Example::

        >>> from spcl_fast.run.presets import smoke
        >>> cfg = apply_overrides(smoke(), {"lr": "3e-4", "class-token": "yes", "depth": "none"})
        >>> cfg.optim.lr, cfg.model.class_token, cfg.model.depth
        (0.0003, True, None)
        >>> apply_overrides(smoke(), {"step": "5"})
        Traceback (most recent call last):
        ...
        ValueError: unknown option --step; did you mean --steps?
    """
    args = [w for key, text in overrides.items() for w in _tyro_args(key, text)]
    if not args:
        return config
    try:
        return _quiet_cli(args, config)
    except SystemExit:
        for key, text in overrides.items():  # name the flag that did not parse
            try:
                _quiet_cli(_tyro_args(key, text), config)
            except SystemExit:
                raise ValueError(_parse_error(key, text)) from None
        raise


def _quiet_cli(args: list[str], default: TrainConfig) -> TrainConfig:
    """tyro's parse, its error boxes silenced (the caller words a one-line error)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return tyro.cli(_cli_type(), args=args, default=default, console_outputs=False)


def print_help(config: TrainConfig, prog: str) -> None:
    """tyro's help: every flag, by section, with its comment and its value in ``config``
    (without tyro's usage line: the caller prints its own)."""
    text = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(text):
        tyro.cli(_cli_type(), args=["--help"], default=config, prog=prog,
                 description="Every setting, by section.")
    lines = text.getvalue().splitlines()
    while lines and (lines[0].startswith("usage:") or not lines[0].strip()):
        lines.pop(0)
    print("\n".join(lines))
