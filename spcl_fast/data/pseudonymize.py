"""A pseudonymous view of an image tree, for archives whose folder or file names identify
patients: ``python -m spcl_fast.data.pseudonymize SRC DST --key-file KEY``.

::

    python -m spcl_fast.data.pseudonymize /archive/by-mrn /data/pseudo --key-file ~/.spcl-key
    python -m spcl_fast.data.prepare --dataset folder --root /data/pseudo --out /data/pseudo-256

Every folder and file name under ``SRC`` is replaced by a keyed hash of its path relative to
``SRC`` (HMAC-SHA256 with a secret key, 16 hex digits; file extensions are kept so readers
still recognise the format), and ``DST`` receives the same tree of folders holding symbolic
links to the original files. Given ``DST``, the ``folder`` dataset's ids, the cache index,
reports, warnings and logs name only hashes. The same key always gives the same names, so
running again after new files arrive adds them and a patient's folder keeps its name (splits
stay patient-disjoint). No mapping is written: without the key the names cannot be reversed
or tested against a guess; keep the key file out of ``DST`` and out of shared storage.

Only names are pseudonymised: the pixels (burned-in text included) are the files' own, and
DICOM headers stay in the files (the library reads only their pixel-module tags).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys

from ..cli import ArgumentParser

KEY_BYTES = 32


def load_key(path: str, create: bool = True) -> bytes:
    """The secret key in ``path``; with ``create``, a new random key is written there (mode
    0600) when the file does not exist."""
    if not os.path.exists(path):
        if not create:
            raise ValueError(f"{path}: no key file")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
    with open(path, "rb") as f:
        key = f.read()
    if len(key) < 16:
        raise ValueError(f"{path}: a key needs at least 16 bytes, the file holds {len(key)}")
    return key


def pseudonym(key: bytes, rel_path: str) -> str:
    """The name that replaces the last component of ``rel_path`` (``/``-separated, relative
    to the source root): 16 hex digits of HMAC-SHA256, plus the extension of a file name."""
    digest = hmac.new(key, rel_path.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
    return digest + os.path.splitext(rel_path.rsplit("/", 1)[-1])[1].lower()


def pseudonymize(src, dst, key: bytes) -> int:
    """Link every file under ``src`` into ``dst`` under pseudonymous names (module docstring);
    hidden files and folders are left out, symbolic links to folders not followed. Returns the
    number of files linked (already present ones included)."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isdir(src):
        raise ValueError(f"{src}: not a folder")
    if os.path.commonpath([src, dst]) == src:
        raise ValueError(f"{dst}: the view must lie outside the source folder {src}")
    count = 0
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, src).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        parts = rel.split("/") if rel else []
        target_dir = os.path.join(dst, *(pseudonym(key, "/".join(parts[:i + 1]))
                                         for i in range(len(parts))))
        os.makedirs(target_dir, exist_ok=True)
        for f in sorted(files):
            if f.startswith("."):
                continue
            source = os.path.join(folder, f)
            link = os.path.join(target_dir, pseudonym(key, f"{rel}/{f}" if rel else f))
            if os.path.lexists(link):
                if os.path.realpath(link) != os.path.realpath(source):
                    raise ValueError(f"{link}: exists and is not a link to its source file")
            else:
                os.symlink(source, link)
            count += 1
    return count


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m spcl_fast.data.pseudonymize",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image tree whose names may identify patients")
    p.add_argument("dst", help="folder for the pseudonymous tree of links (created)")
    p.add_argument("--key-file", required=True,
                   help="secret key (created with a random key if absent); keep it private")
    a = p.parse_args(argv)
    try:
        existed = os.path.exists(a.key_file)
        key = load_key(a.key_file)
        count = pseudonymize(a.src, a.dst, key)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    made = "" if existed else f" (new key written to {a.key_file})"
    print(f"{a.dst}: {count} files linked under pseudonymous names{made}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
