"""`lifelong data image-stream`: real handwritten digits as class-incremental windows of PNGs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lifelong.cli import main


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code or 0


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_windows_hold_their_digits_in_class_folders_as_the_scikit_learn_images_upscaled(tmp_path, capsys):
    from sklearn.datasets import load_digits

    assert run_cli("data", "image-stream", tmp_path / "s", "--windows", 3, "--per-class", 4, "--size", 24) == 0
    assert "wrote 3 windows of 2 digits (24 PNG images, 24x24 greyscale" in " ".join(capsys.readouterr().out.split())
    windows = sorted((tmp_path / "s").iterdir())
    assert [w.name for w in windows] == ["window-000", "window-001", "window-002"]
    assert [sorted(f.name for f in w.iterdir()) for w in windows] == [["0", "1"], ["2", "3"], ["4", "5"]]
    digits = load_digits()
    for w in windows:
        for folder in w.iterdir():
            files = sorted(folder.glob("*.png"))
            assert len(files) == 4
            for f in files:
                image = Image.open(f)
                assert (image.size, image.mode) == ((24, 24), "L")
                index = int(f.stem)
                assert digits.target[index] == int(folder.name)  # the file is an image of its folder's digit
                source = Image.fromarray((digits.images[index] * (255 / 16)).round().astype(np.uint8))
                assert np.array_equal(np.asarray(image), np.asarray(source.resize((24, 24), Image.Resampling.BILINEAR)))


def test_every_image_of_a_digit_by_default_and_the_same_arguments_write_the_same_bytes(tmp_path):
    from sklearn.datasets import load_digits

    target = load_digits().target
    assert run_cli("data", "image-stream", tmp_path / "a", "--windows", 1) == 0
    assert len(list((tmp_path / "a/window-000/0").glob("*.png"))) == int((target == 0).sum()) > 170
    assert len(list((tmp_path / "a/window-000/1").glob("*.png"))) == int((target == 1).sum()) > 170
    for name, seed in (("b", 0), ("c", 0), ("d", 1)):
        assert run_cli("data", "image-stream", tmp_path / name, "--windows", 2, "--per-class", 5, "--seed", seed) == 0
    assert tree_digest(tmp_path / "b") == tree_digest(tmp_path / "c") != tree_digest(tmp_path / "d")


def test_more_digits_than_there_are_is_one_message(tmp_path, capsys):
    assert run_cli("data", "image-stream", tmp_path / "x", "--windows", 4, "--classes", 3) == 2
    err = capsys.readouterr().err
    assert "--windows 4 x --classes 3 needs 12 digits; there are 10" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written
    assert run_cli("data", "image-stream", tmp_path / "x", "--size", 4) == 2
