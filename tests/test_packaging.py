"""What the gateway is installed from: every package of the project gets into the wheel and
into the image."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_and_subpackage_is_installed() -> None:
    # setuptools installs the packages listed and nothing under them: a subpackage left out
    # (kernel.config) is missing from the wheel, and the installed gateway fails to import.
    tops = {package.split(".")[0] for package in PACKAGES}
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in tops for init in (ROOT / top).rglob("__init__.py")}
    assert found == set(PACKAGES)


def test_every_package_is_in_the_image_build_context() -> None:
    # ./Containerfile installs what .dockerignore lets in: a package left out of it is missing
    # from the image (found only by the container tier).
    allowed = {line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    tops = {package.split(".")[0] for package in PACKAGES}
    assert tops <= allowed, f"not in .dockerignore: {tops - allowed}"
