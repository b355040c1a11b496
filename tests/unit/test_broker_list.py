"""The broker list (#15): which broker the MQTT links try next and how long they wait (agent.core.brokers, pure),
the agent's `mqtt.brokers` / `mqtt.protocol` config, and the link's rotation and status without a broker.

The rotation on a real cluster (an agent on node A, node A killed, the agent back through node B, a dispatch sent
through node C reaching it) is in tests/coordinator/test_program_cluster.py."""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.config import ConfigError, load_config
from hashflex.agent.core.brokers import BACKOFF_MAX_S, HOP_JITTER_S, HOP_S, Broker, Rotation, retry_delay_s
from hashflex.agent.io.mqtt import FailureKind, backoff_s
from hashflex.contract import signing
from hashflex.coordinator.fabric import MqttFabric
from tests.mqtt_support import make_link

UNIT = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def test_one_broker_keeps_the_single_broker_backoff() -> None:
    # exactly the link's backoff before the list existed: min(1.8**(n-1), 60) s plus up to 1 + 10 % of it
    for failures in range(1, 12):
        base = min(1.8 ** (failures - 1), 60.0)
        assert retry_delay_s(failures, 1, 0.0) == pytest.approx(base)
        assert retry_delay_s(failures, 1, 0.999999) == pytest.approx(base + 1.0 + 0.1 * base, rel=1e-5)
    assert retry_delay_s(1, 1, 0.0, hard=True) == BACKOFF_MAX_S


def test_a_round_tries_every_broker_at_once_then_backs_off() -> None:
    delays = [retry_delay_s(n, 3, 0.0) for n in range(1, 10)]
    hop = HOP_S
    assert delays == pytest.approx([hop, hop, 1.0, hop, hop, 1.8, hop, hop, 1.8**2])


def test_a_hard_failure_waits_the_maximum_even_mid_round() -> None:
    assert retry_delay_s(1, 3, 0.0, hard=True) == BACKOFF_MAX_S
    assert backoff_s(1, FailureKind.AUTH, brokers=3) >= BACKOFF_MAX_S
    assert backoff_s(1, FailureKind.TRANSIENT, brokers=3) <= HOP_S + HOP_JITTER_S


@pytest.mark.parametrize(("failures", "brokers", "unit"), [(1, 0, 0.5), (1, 1, 1.0), (1, 1, -0.1)])
def test_bad_arguments_are_refused(failures: int, brokers: int, unit: float) -> None:
    with pytest.raises(ValueError, match=r"brokers|unit"):
        retry_delay_s(failures, brokers, unit)


@given(brokers=st.integers(1, 8), start=st.integers(0, 200), unit=UNIT)
def test_every_round_tries_each_broker_once_before_one_wait(brokers: int, start: int, unit: float) -> None:
    """In any `brokers` failures in a row exactly one is followed by a backoff; the others hop at once."""
    delays = [retry_delay_s(start + k, brokers, unit) for k in range(1, brokers + 1)]
    hops = [d for d in delays if d <= HOP_S + HOP_JITTER_S]
    waits = [d for d in delays if d >= 1.0]
    assert len(waits) == 1
    assert len(hops) == brokers - 1 or brokers == 1


@given(brokers=st.integers(1, 8), failures=st.integers(1, 10_000), unit=UNIT, hard=st.booleans())
def test_delays_are_bounded(brokers: int, failures: int, unit: float, hard: bool) -> None:
    delay = retry_delay_s(failures, brokers, unit, hard=hard)
    assert HOP_S <= delay <= BACKOFF_MAX_S * 1.1 + 1.0
    assert delay >= BACKOFF_MAX_S if hard else True


@given(brokers=st.integers(1, 8), rounds=st.integers(1, 20), unit=UNIT)
def test_the_wait_grows_by_rounds(brokers: int, rounds: int, unit: float) -> None:
    this = retry_delay_s(rounds * brokers, brokers, 0.0)
    after = retry_delay_s((rounds + 1) * brokers, brokers, 0.0)
    assert after >= this
    assert retry_delay_s(rounds * brokers, brokers, unit) >= this


def test_the_rotation_visits_each_broker_in_order_and_wraps() -> None:
    nodes = [Broker("10.0.0.1", 1883), Broker("10.0.0.2", 1883), Broker("fd00::3", 8883)]
    rotation = Rotation(nodes)
    assert rotation.current == nodes[0]
    assert [rotation.advance() for _ in range(4)] == [nodes[1], nodes[2], nodes[0], nodes[1]]
    assert len(rotation) == 3
    assert str(nodes[2]) == "[fd00::3]:8883"
    with pytest.raises(ValueError, match="at least one broker"):
        Rotation([])
    with pytest.raises(ValueError, match="at least one broker"):
        MqttFabric([], "coordinator")


# ------------------------------------------------------------------------------------------------ config
def _site_file(tmp_path: Path, mqtt: dict[str, object]) -> Path:
    pub = tmp_path / "grid.pub"
    pub.write_bytes(signing.generate_keypair()[1])
    doc = {
        "site": {"id": "karachi-1", "cap_kw": 1000},
        "mqtt": mqtt,
        "grid": {"public_keys": [str(pub)]},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_broker_list_in_the_config(tmp_path: Path) -> None:
    path = _site_file(
        tmp_path, {"brokers": [{"host": "nats-1.grid"}, {"host": "nats-2.grid", "port": 1884}], "protocol": "3.1.1"}
    )
    cfg = load_config(path)
    assert cfg.mqtt.endpoints() == [("nats-1.grid", 1883), ("nats-2.grid", 1884)]
    assert cfg.mqtt.protocol == "3.1.1"
    # the single host/port form still works, and is a list of one
    single = load_config(_site_file(tmp_path, {"host": "mosquitto.local", "port": 1883, "protocol": 5}))
    assert single.mqtt.endpoints() == [("mosquitto.local", 1883)]
    assert single.mqtt.protocol == "5"  # YAML reads 5 as a number


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ({"brokers": [{"host": "a"}, {"host": "b", "port": 70000}]}, "mqtt.brokers[1].port = 70000"),
        ({"brokers": [{"host": ""}]}, "mqtt.brokers[0].host = ''"),
        ({"brokers": [{"host": "a", "hostname": "a"}]}, "mqtt.brokers[0].hostname: unknown key"),
        ({"host": "a", "brokers": [{"host": "b"}]}, "mqtt: host = 'a' set beside brokers"),
        ({"protocol": "4"}, "mqtt.protocol = '4'"),
    ],
)
def test_broker_list_errors_name_the_file_the_field_and_the_value(
    tmp_path: Path, mqtt: dict[str, object], expected: str
) -> None:
    path = _site_file(tmp_path, mqtt)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


# -------------------------------------------------------------------------------------- the link, offline
def test_the_link_moves_to_the_next_broker_after_a_failure_and_says_which(tmp_path: Path) -> None:
    path = _site_file(
        tmp_path, {"brokers": [{"host": "127.0.0.1", "port": p} for p in (1001, 1002, 1003)], "protocol": "3.1.1"}
    )
    link, _, _ = make_link(load_config(path))
    status = link.status()
    assert status["address"] == "127.0.0.1:1001"
    assert status["brokers"] == ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]
    assert status["protocol"] == "3.1.1"  # configured: no MQTT 5 attempt first
    delays = []
    for _ in range(3):
        delay = link._after_failure(aiomqtt.MqttError("[Errno 111] Connection refused"))
        assert delay is not None
        delays.append(delay)
    assert link.status()["address"] == "127.0.0.1:1001"  # round the list and back to the first
    assert max(delays[:2]) <= HOP_S + HOP_JITTER_S  # the untried brokers of the round: at once
    assert delays[2] >= 1.0  # every broker failed: the backoff
    link._after_failure(aiomqtt.MqttError("[Errno 111] Connection refused"))
    assert link.status()["address"] == "127.0.0.1:1002"
