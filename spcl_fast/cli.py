"""What every command line of the package shares: bad input ends in one ``error:`` line that
names the problem (the closest option, subcommand or choice suggested where there is one), and
``--threads`` sets torch's CPU threads.

:class:`ArgumentParser` is argparse with that error line; :func:`tyro_cli` runs a tyro parser
and turns its error boxes into that line. ``train`` parses its own flags
(:mod:`spcl_fast.train.__main__`) with the same wording.

Example::

    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--size", type=int)
    >>> try:
    ...     parser.parse_args(["--sise", "3"])
    ... except SystemExit as exc:
    ...     print(exc.code)
    error: unrecognized arguments: --sise 3; did you mean --size? (demo --help lists the options)
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import re
from collections.abc import Callable, Iterable

import torch

THREADS_HELP = "CPU threads for torch (default: torch's own choice, often every core)"


def suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` (or ``"X or Y"``) for the choices closest to ``word``; ``""``
    when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def positive_int(text: str) -> int:
    """argparse ``type`` of counts that must be >= 1 (``--threads``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def set_threads(threads: int | None) -> str:
    """Use ``threads`` CPU threads in torch (``None``: leave torch's default); returns the line
    that says how many are used and how to change them."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return threads_line()


def threads_line() -> str:
    """How many CPU threads torch uses, and how to change them."""
    return f"using {torch.get_num_threads()} CPU thread(s); change with --threads"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: <problem>[; did you mean ...?]
    (<prog> --help lists the options)`` (exit status 1, as the commands' other errors);
    abbreviated options are not taken (``--out`` never stands for ``--out-dir``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = ""
        if unknown := re.match(r"unrecognized arguments: (\S+)", message):
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hint = suggest(unknown.group(1).split("=")[0], flags)
        elif choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            hint = suggest(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        raise SystemExit(f"error: {message}{hint} ({self.prog} --help lists the options)")


def _box_text(text: str) -> str:
    """The first section of a tyro error box as one line: its title and rules dropped (a box
    drawn with lines when the stream takes them, else a title over a rule of dashes)."""
    sections, lines = [], []
    for line in text.splitlines():
        line = line.strip().strip("│").strip()
        if line.startswith(("╭", "╰")) or not line:
            continue
        if set(line) <= set("─- "):  # a rule ends a section
            sections.append(lines)
            lines = []
        else:
            lines.append(line)
    sections.append(lines)
    if not text.lstrip().startswith("╭") and len(sections) > 1 and len(sections[0]) == 1:
        sections.pop(0)  # the title above the first rule
    first = next((s for s in sections if s), [])
    return " ".join(" ".join(first).split())


def tyro_cli(parse: Callable, argv: list[str], prog: str, flags: Iterable[str] = (),
             subcommands: Iterable[str] = ()):
    """``parse(args=argv, prog=prog)`` (a tyro entry point), its usage errors as one ``error:``
    line: an unknown subcommand or flag names the closest of ``subcommands``/``flags``, other
    errors keep tyro's first sentence. ``--help`` prints as tyro prints it."""
    subcommands = list(subcommands)
    if subcommands and argv and argv[0] not in subcommands and not argv[0].startswith("-"):
        raise SystemExit(f"error: unknown command {argv[0]!r}{suggest(argv[0], subcommands)} "
                         f"(choose from {', '.join(subcommands)}; {prog} --help)")
    if subcommands and not argv:
        raise SystemExit(f"error: name a command: {', '.join(subcommands)} "
                         f"({prog} COMMAND --help lists its options)")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse(args=argv, prog=prog)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        message = _box_text(captured.getvalue()) or f"cannot parse {' '.join(argv)!r}"
        hint = ""
        if unknown := re.match(r"Unrecognized options?: (\S+?)(,|$| )", message):
            hint = suggest(unknown.group(1).split("=")[0], flags)
            message = f"unknown option {unknown.group(1)}"
        elif missing := re.match(r"Missing from .*?: (--\S+)", message):
            message = f"{missing.group(1)} is required"
        elif bad := re.match(r"Error parsing (--\S+): (invalid literal for int\(\)|could not "
                             r"convert string to float).*: (.*)", message):
            kind = "a whole number" if "int" in bad.group(2) else "a number"
            message = f"{bad.group(1)} takes {kind}, got {bad.group(3)}"
        elif bad := re.match(r"Error parsing (--\S+): Could not find valid parse for "
                             r"arguments: \[(.*)\]", message):
            message = f"{bad.group(1)}: cannot parse {bad.group(2)}"
        elif choice := re.match(r"invalid choice '(.*)' for argument '(--\S+)'\. Expected one "
                                r"of \((.*)\)", message):
            choices = re.findall(r"'([^']*)'", choice.group(3))
            hint = suggest(choice.group(1), choices)
            message = (f"{choice.group(2)} must be one of {', '.join(sorted(set(choices)))}, "
                       f"got {choice.group(1)!r}")
        where = f"{prog} {argv[0]}" if subcommands and argv and argv[0] in subcommands else prog
        raise SystemExit(f"error: {message}{hint} ({where} --help lists the options)") from None
