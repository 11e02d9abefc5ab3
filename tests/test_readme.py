"""The README says what is true: its two commands exist, its CSV example is a valid dataset, it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_two_commands_exist_and_ci_calls_the_test_one():
    quick = README[README.index("## Quick start"):README.index("## Your own photos")]
    assert re.findall(r"^make (\w+)", quick, re.M) == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_csv_example_is_a_valid_dataset(tmp_path, run_cli):
    block = re.search(r"```text\n( *image,labels\n.*?)```", README, re.S).group(1)
    block = "\n".join(ln.strip() for ln in block.strip().splitlines()) + "\n"  # the example is indented in a list
    rows = [ln.split(",") for ln in block.splitlines()[1:]]
    names = sorted({c for _, labels in rows for c in labels.split()})
    (tmp_path / "classes.txt").write_text("background\n" + "\n".join(names) + "\n")
    for rel, _ in rows:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / rel)
    (tmp_path / "photos.csv").write_text(block)
    code, out, err = run_cli("data", "check", tmp_path / "photos.csv")
    assert code == 0, err
    assert f"ok: {len(rows)} images" in out


def test_readme_is_a_guide_not_a_lab_notebook():
    assert len(README.encode()) <= 15_000
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link
