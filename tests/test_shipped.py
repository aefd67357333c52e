"""The shipped recipes and assets: found in a checkout and after an install, and packaged completely."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO
from n2ce_distill import shipped as shipped_module
from n2ce_distill.shipped import shipped


def test_checkout_first_then_the_install_prefix(tmp_path, monkeypatch):
    assert shipped("recipes", "digits_dxmi_n2ce.yaml") == REPO / "recipes" / "digits_dxmi_n2ce.yaml"
    install = tmp_path / "share" / "n2ce-distill"
    (install / "assets" / "digits-teacher").mkdir(parents=True)
    monkeypatch.setattr(shipped_module, "SHIPPED_ROOTS", (tmp_path / "site-packages", install))
    assert shipped("assets", "digits-teacher") == install / "assets" / "digits-teacher"
    assert shipped("assets", "nothing") == tmp_path / "site-packages" / "assets" / "nothing"  # named in the error


@pytest.mark.slow
def test_the_wheel_carries_every_tracked_recipe_and_asset(tmp_path):
    """pip install . outside a checkout: the wheel's data folder mirrors recipes/ and assets/ file for file."""
    tracked = subprocess.run(["git", "ls-files", "recipes", "assets"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    source = tmp_path / "source"  # a copy, so the build's own folders never land in the checkout
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "n2ce_distill", "recipes", "assets"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("n2ce_distill-*.whl")
    prefix = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.data/data/share/n2ce-distill/"
    packaged = {name[len(prefix):] for name in zipfile.ZipFile(wheel).namelist() if name.startswith(prefix)}
    assert packaged == set(tracked.stdout.split())
