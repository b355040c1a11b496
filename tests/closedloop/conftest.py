"""The closed-loop harness quiets the agent's logging for the whole process (thousands of ticks a second would
flood the output); give the tests that run after these the logging they expect back."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from hashflex.agent.config import LoggingConfig
from hashflex.agent.logging import configure_logging


@pytest.fixture(autouse=True, scope="package")
def _logging_back_after_the_closed_loop() -> Iterator[None]:
    yield
    configure_logging(LoggingConfig(), force_json=True, stream=io.StringIO())
