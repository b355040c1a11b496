"""The simulated meter's physics and grid model, in process and on explicit sim times (no sockets): the energy
integral is exact at steady load, cooling follows IT power with its first-order lag, losses grow with the square
of the load, and the scripted frequency paths (step, ramp, dip, trace) are what they say."""

from __future__ import annotations

import math

import pytest

from hashflex.sim.grid import GridModel, GridSpecError
from hashflex.sim.meter import MeterModel, MeterParams, MeterSpecError, parse_address
from hashflex.sim.site import Site


def _site(miners: int = 8) -> Site:
    # not started: no listeners, only the devices and their physics (base_ip is never bound)
    return Site(miners=miners, mix="luxos:1,whatsminer:1", base_ip="127.161.0.1", seed=5, speed=1.0)


def test_steady_load_integrates_exactly() -> None:
    site = _site()
    params = MeterParams(cooling_share=0.06, base_kw=3.0, loss_share=0.01)
    model = MeterModel(params, site)
    t0 = model.t
    f0 = model.advance(t0)
    it = sum(d.physics.power_w(t0) for d in site.devices)
    assert f0.it_w == pytest.approx(it)
    assert f0.cooling_w == pytest.approx(0.06 * it)  # settled at start
    load = it * 1.06 + 3000.0
    assert f0.losses_w == pytest.approx(0.01 * load * load / model.rated_w)
    f1 = model.advance(t0 + 3600.0)
    assert f1.energy_j == pytest.approx(f0.total_w * 3600.0, rel=1e-9)


def test_cooling_follows_it_power_with_a_first_order_lag() -> None:
    site = _site()
    tau = 60.0
    model = MeterModel(MeterParams(cooling_share=0.05, cooling_tau_s=tau, base_kw=0.0, loss_share=0.0), site)
    t0 = model.t
    before = model.advance(t0)
    for dev in site.devices:
        dev.physics.sleep(t0)  # down to the sleep draw within 4 s
    after_it = sum(d.physics.power_w(t0 + 10.0) for d in site.devices)
    settled, start = 0.05 * after_it, before.cooling_w
    # the drop takes 4 s (SLEEP_RAMP_S): by 4 + tau the gap has shrunk by e within the ramp's few seconds
    for dt in (30.0, 64.0, 124.0, 304.0):
        cooling = model.advance(t0 + dt).cooling_w
        assert settled < cooling < start
        lo = settled + (start - settled) * math.exp(-dt / tau)
        hi = settled + (start - settled) * math.exp(-(dt - 4.0) / tau)
        assert lo * 0.999 <= cooling <= hi * 1.001
    # the energy counts what cooling drew on the way down: for a first-order lag, ∫(cooling − share × IT) dt =
    # tau × (cooling at the start − cooling at the end), whatever the IT path
    f = model.advance(t0 + 600.0)
    it_j = sum(d.physics.energy_at(t0 + 600.0) - d.physics.energy_at(t0) for d in site.devices)
    assert f.energy_j - it_j == pytest.approx(0.05 * it_j + tau * (start - f.cooling_w), rel=1e-6)
    assert f.energy_j - it_j > 0.05 * it_j + tau * (start - settled) * 0.99


def test_losses_grow_with_the_square_of_the_load() -> None:
    site = _site()
    model = MeterModel(MeterParams(loss_share=0.02, rated_kw=100.0, base_kw=0.0), site)
    assert model.losses(50_000.0, 0.0) == pytest.approx(0.02 * 100_000.0 * 0.25)
    assert model.losses(100_000.0, 0.0) == pytest.approx(0.02 * 100_000.0)


def test_meter_parameters_are_validated() -> None:
    for doc in (
        {"cooling_share": 2},
        {"noise": float("nan")},
        {"base_kw": True},
        {"colour": 1},
        [1],
        {"unit": 0},
        {"counter_kwh": -1},
    ):
        with pytest.raises(MeterSpecError):
            MeterParams.from_json(doc)
    assert MeterParams.from_json({"cooling_share": 0.08, "rated_kw": None}).cooling_share == 0.08
    assert parse_address("127.0.0.250") == ("127.0.0.250", 5020)
    assert parse_address("127.0.0.250:502") == ("127.0.0.250", 502)
    for bad in ("10.0.0.1:502", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(MeterSpecError):
            parse_address(bad)


def test_grid_step_ramp_dip_and_trace() -> None:
    g = GridModel(nominal_hz=50.0, noise_hz=0.0)
    assert g.hz(10.0) == 50.0
    g.apply({"event": "step", "hz": 49.8}, now=10.0)
    assert g.hz(9.99) == 50.0
    assert g.hz(10.0) == 49.8
    assert g.hz(1e5) == 49.8
    g.apply({"event": "ramp", "hz": 50.2, "duration_s": 4.0}, now=20.0)
    assert g.hz(20.0) == pytest.approx(49.8)
    assert g.hz(22.0) == pytest.approx(50.0)
    assert g.hz(30.0) == 50.2
    g.apply({"event": "dip", "depth_hz": 0.9, "duration_s": 0.5, "at_s": 40.0}, now=30.0)
    assert g.hz(39.99) == pytest.approx(50.2)
    assert g.hz(40.0) == pytest.approx(49.3)
    assert g.hz(40.49) == pytest.approx(49.3)
    assert g.hz(40.5) == pytest.approx(50.2)  # recover_s 0: straight back
    g.apply({"event": "dip", "depth_hz": 1.0, "duration_s": 2.0, "fall_s": 1.0, "recover_s": 2.0}, now=50.0)
    assert g.hz(50.5) == pytest.approx(49.7)
    assert g.hz(52.0) == pytest.approx(49.2)
    assert g.hz(54.0) == pytest.approx(49.7)
    assert g.hz(60.0) == pytest.approx(50.2)
    g.apply({"event": "trace", "points": [[0, 50.0], [1.0, 49.5], [1.0, 49.6], [3.0, 50.1]]}, now=70.0)
    assert g.hz(70.5) == pytest.approx(49.75)
    assert g.hz(71.0) == pytest.approx(49.6)
    assert g.hz(72.0) == pytest.approx(49.85)
    assert g.hz(100.0) == pytest.approx(50.1)
    g.apply({"event": "nominal"}, now=110.0)
    assert g.hz(110.0) == 50.0


def test_grid_noise_is_seeded_and_small() -> None:
    a, b = GridModel(noise_hz=0.002, seed=3), GridModel(noise_hz=0.002, seed=3)
    samples = [a.hz(t / 100.0) for t in range(2000)]
    assert samples == [b.hz(t / 100.0) for t in range(2000)]
    assert max(abs(s - 50.0) for s in samples) < 0.012
    assert len(set(samples)) > 1500


@pytest.mark.parametrize(
    "event",
    [
        {"event": "step"},
        {"event": "step", "hz": 80},
        {"event": "step", "hz": float("nan")},
        {"event": "ramp", "hz": 49, "duration_s": -1},
        {"event": "dip", "depth_hz": 0, "duration_s": 1},
        {"event": "dip", "depth_hz": 15, "duration_s": 1},
        {"event": "trace", "points": [[1, 50], [0, 50]]},
        {"event": "trace", "points": []},
        {"event": "trace", "points": [[0, "fifty"]]},
        {"event": "boom"},
        {"event": "step", "hz": 49, "extra": 1},
        {"event": "step", "hz": 49, "at_s": 5.0},
        "step",
    ],
)
def test_bad_grid_events_are_refused_and_change_nothing(event: object) -> None:
    g = GridModel(noise_hz=0.0)
    g.apply({"event": "step", "hz": 49.9}, now=0.0)
    with pytest.raises(GridSpecError):
        g.apply(event, now=10.0)
    assert g.hz(1e4) == 49.9
