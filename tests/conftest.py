import logging

import pytest

from backends import states
from proxy.logs import configure_logging

# A server's state moving off its table is a bug: the tests fail on it (production logs it).
states.STRICT = True


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Warnings and errors only: the access log of thousands of requests hides a failure."""
    configure_logging("console", level=logging.WARNING)
