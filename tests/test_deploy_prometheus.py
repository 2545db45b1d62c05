"""deploy/prometheus: valid for Prometheus, and every query names a metric the sidecar has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from order_sidecar.telemetry.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        names.add(family.name)
        if family.type == "counter":  # labelled counters have no sample until first used
            names.add(f"{family.name}_total")
    return names


def queried_names(expression: str) -> set[str]:
    return set(re.findall(r"\bordersidecar_[a-z_]+", expression))


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool not installed (.ci/run installs it)"
)
def test_promtool_accepts_config_and_rules() -> None:
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run(
            ["promtool", *command],
            cwd=DEPLOY,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_and_dashboard_use_real_metrics() -> None:
    known = exported_names() | {
        f"{name}_bucket"
        for name in ("ordersidecar_rpc_seconds", "ordersidecar_lock_acquire_seconds")
    }
    rules = (DEPLOY / "alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = [rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(queried_names(e) for e in expressions))
    assert used, "no ordersidecar_ metric referenced"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"
    for alert in (
        "LockLost",
        "FencingRejections",
        "PublishErrors",
        "BackendDown",
        "PublishLatencyHigh",
    ):
        assert f"OrderSidecar{alert}" in rules
