import logging

import pytest

from proxy.logs import configure_logging


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Warnings and errors only: the access log of thousands of requests hides a failure."""
    configure_logging("console", level=logging.WARNING)
