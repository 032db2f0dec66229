"""What the browser tests say when the machine lacks the browser or its driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dashboard import conftest


@pytest.mark.parametrize("missing", ["CHROMIUM", "CHROMEDRIVER"])
def test_the_skip_reason_names_both_debian_packages(missing: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, missing, str(tmp_path / "absent"))
    problem = conftest._problem()
    assert problem is not None
    assert problem.startswith(f"{tmp_path / 'absent'} missing: ")
    assert "apt-get install chromium chromium-driver" in problem
