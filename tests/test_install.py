"""The package as pip installs it: man pages in PREFIX/share/man/man1 (issue 15)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_every_man_page(tmp_path):
    """Build the wheel as `pip install .` does and look inside: every page of man/ goes to
    share/man/man1 (the wheel's .data/data/ tree is installed into the environment's prefix)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("unet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    pages = {Path(n).name for n in names if "/data/share/man/man1/" in n}
    assert pages == {p.name for p in (ROOT / "man").glob("*.1")}


def test_man_finds_the_pages_in_this_environment():
    """After `pip install` (editable or not) `man -w unet` finds the page through the environment's
    prefix, as it does for a user whose PATH holds the environment's bin/."""
    page = Path(sys.prefix) / "share" / "man" / "man1" / "unet.1"
    if not page.is_file():
        pytest.skip(f"the package is not installed into {sys.prefix} with its data files (reinstall with pip)")
    assert page.read_text(encoding="utf-8").startswith(".TH UNET 1")
    if shutil.which("man") is None:
        pytest.skip("man(1) is not installed on this machine")
    proc = subprocess.run(["man", "-w", "unet"], capture_output=True, text=True,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "MANPATH": ""})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("unet.1"), proc
