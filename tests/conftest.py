"""Fixtures shared by several test folders. Keep it small: each fixture here is used in more than one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker import Mosquitto, Pki, make_pki


@pytest.fixture(scope="session")
def mosquitto_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, server and client certificates (and a wrong CA) for the whole session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, mosquitto_pki: Pki) -> Iterator[Mosquitto]:
    """One real Mosquitto (example config: plain, password and TLS listeners) for the session.

    Tests share it, so each must use its own topic root / site id. Tests that kill or restart a broker use
    `mosquitto_factory` instead.
    """
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), pki=mosquitto_pki).start()
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path, mosquitto_pki: Pki) -> Iterator[Callable[[], Mosquitto]]:
    """Private brokers, started on demand and stopped at the end of the test."""
    brokers: list[Mosquitto] = []

    def make() -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", pki=mosquitto_pki).start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()
