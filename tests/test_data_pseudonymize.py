"""The pseudonymous view of an image tree (``spcl_fast.data.pseudonymize``): names replaced by
keyed hashes, images and patient grouping unchanged, nothing of the source names left."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from spcl_fast.data import CXRFolder
from spcl_fast.data.pseudonymize import load_key, main, pseudonymize

NAMES = ["DOE_JANE_MRN004417", "SMITH^JOHN", "study-2019-04-05", "jane-doe-pa.png",
         "smith-lateral.png", "extra.png"]


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    files = ["DOE_JANE_MRN004417/study-2019-04-05/jane-doe-pa.png",
             "DOE_JANE_MRN004417/study-2019-04-05/smith-lateral.png",
             "SMITH^JOHN/extra.png", "SMITH^JOHN/.hidden.png"]
    for k, rel in enumerate(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(path)
    return root


def test_view_reads_the_same_images_under_hashed_names(archive, tmp_path):
    key = load_key(str(tmp_path / "key"))
    view = tmp_path / "view"
    assert pseudonymize(archive, view, key) == 3  # the hidden file left out
    paths = [os.path.relpath(os.path.join(d, f), view) for d, _, fs in os.walk(view) for f in fs]
    assert len(paths) == 3 and not any(n in p for p in paths for n in NAMES)
    source, pseudo = CXRFolder(archive, image_size=8), CXRFolder(view, image_size=8)
    assert sorted(source.images().sum((1, 2, 3)).tolist()) == \
        sorted(pseudo.images().sum((1, 2, 3)).tolist())
    # A patient's folder stays one group: 2 images for one patient, 1 for the other.
    assert sorted(Counter(pseudo.patient_ids).values()) == [1, 2]
    # The same key gives the same view (a re-run adds nothing); another key another one.
    assert pseudonymize(archive, view, key) == 3
    assert sorted(paths) == sorted(os.path.relpath(os.path.join(d, f), view)
                                   for d, _, fs in os.walk(view) for f in fs)
    other = tmp_path / "other"
    pseudonymize(archive, other, b"another key of sixteen+ bytes")
    assert not set(os.listdir(other)) & set(os.listdir(view))


def test_cli_and_its_errors(archive, tmp_path, capsys):
    key = tmp_path / "key"
    assert main([str(archive), str(tmp_path / "v"), "--key-file", str(key)]) == 0
    assert "3 files linked" in capsys.readouterr().out and os.stat(key).st_mode & 0o077 == 0
    with pytest.raises(SystemExit, match="error: .*outside the source folder"):
        main([str(archive), str(archive / "v"), "--key-file", str(key)])
    with pytest.raises(SystemExit, match="error: .*not a folder"):
        main([str(tmp_path / "absent"), str(tmp_path / "w"), "--key-file", str(key)])
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(SystemExit, match="at least 16 bytes"):
        main([str(archive), str(tmp_path / "w"), "--key-file", str(tmp_path / "short")])
