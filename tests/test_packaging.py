"""What the gateway's image is built from: every package of the project gets into it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_in_the_image_build_context() -> None:
    # ./Containerfile installs what .dockerignore lets in: a package left out of it is missing
    # from the image, and the gateway there fails to import (found only by the container tier).
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    allowed = {line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert set(packages) <= allowed, f"not in .dockerignore: {set(packages) - allowed}"
    assert all((ROOT / package / "__init__.py").is_file() for package in packages)
