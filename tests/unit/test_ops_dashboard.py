"""The Grafana dashboard only queries series the agent exports (a renamed metric would leave a blank panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from hashflex.agent.io.metrics import Metrics
from tests.site_status import STATUS

DASHBOARD = Path(__file__).resolve().parents[2] / "configs/grafana/hashflex-dashboard.json"


# a site with a meter (its section as agent.runtime.metering.MeterControl.doc makes it) and metered energy
METERED_STATUS = {
    **STATUS,
    "meter": {
        "fresh": True,
        "power_kw": 42.0,
        "non_miner_kw": 1.5,
        "non_miner_counted_kw": 2.0,
        "hz": 50.01,
        "age_s": 0.4,
        "import_kwh": 1234.5,
    },
    "energy": {"source": "metered", "minutes": 10, "by_source": {"metered": 10}},
}


def exported_names() -> set[str]:
    metrics = Metrics(
        lambda: METERED_STATUS,
        lambda: [{"ip": "10.0.0.1", "power_w": 1.0, "limit_w": 1.0, "hashrate_ths": 1.0, "temp_c": 1.0}],
    )
    for op in ("set_power",):
        metrics.observe_command(op, "ok", 0.1)
    metrics.count_dispatch("accepted")
    metrics.count_rejected("stale")
    return {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def test_every_queried_series_is_exported() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    queried = {name for expr in exprs for name in re.findall(r"\bhashflex_[a-z_]+", expr)}
    missing = queried - exported_names()
    assert not missing, f"dashboard queries series the agent does not export: {sorted(missing)}"
    titles = " ".join(p["title"] for p in doc["panels"]).lower()
    for topic in (
        "power vs target vs cap",
        "miners by state",
        "dispatch compliance",
        "latency",
        "errors",
        "gateway",
        "metered power",
        "non-miner load",
        "grid frequency",
        "energy minutes by source",
    ):
        assert topic in titles, topic


def test_panels_do_not_overlap() -> None:
    doc = json.loads(DASHBOARD.read_text())
    taken: set[tuple[int, int]] = set()
    for panel in doc["panels"]:
        g = panel["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24
        assert not cells & taken, panel["title"]
        taken |= cells
