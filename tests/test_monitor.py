"""Prometheus on a sweep's cluster (experiments/monitor.py): during a smoke sweep on a head
node, Prometheus's HTTP API returns the project's gauges for the running trial. Skipped
without a prometheus binary (Debian: apt install prometheus)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import HeadNode, free_port

from softteacher.tune.monitor import MonitorError, scrape_config, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
SWEEP_TIMEOUT_S = 600
# Ray reports a worker's metrics and Prometheus scrapes them every 10 s each by default; the
# test shortens both to SCRAPE_S (the head node's and the driver's RAY_metrics_report_...,
# and a copy of Ray's scrape config) and kills the sweep as soon as the gauges are seen.
MAX_STEPS = 400
SCRAPE_S = 2


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]


def test_a_session_without_metrics_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(MonitorError, match="start the sweep first"):
        scrape_config(tmp_path)


@pytest.mark.ray
@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt install prometheus)")
def test_prometheus_scrapes_the_running_trials_gauges(ray_head_node: HeadNode, tmp_path):
    port = free_port()
    ray_config = scrape_config(ray_head_node.session_dir)
    assert "scrape_interval" in ray_config.read_text()
    fast_config = tmp_path / "prometheus.yml"
    fast_config.write_text(
        re.sub(r"scrape_interval: *\S+", f"scrape_interval: {SCRAPE_S}s", ray_config.read_text())
    )
    server = start_prometheus(
        fast_config, tmp_path / "prometheus", port, log_file=tmp_path / "prometheus.log"
    )
    command = [
        sys.executable, str(ROOT / "experiments" / "fold_sweep.py"), "--preset", "smoke",
        "--ratios", "10", "--folds", "1", "--method", "supervised", "--max-steps", str(MAX_STEPS),
        "--address", ray_head_node.gcs_address, "--results-dir", str(tmp_path / "results"),
        "--data-dir", str(tmp_path / "data"),
    ]
    env = ray_head_node.driver_env() | {
        "PYTHONPATH": str(ROOT / "platform"),
        "RAY_metrics_report_interval_ms": str(SCRAPE_S * 1000),
    }
    without_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    found: dict[str, list[dict]] = {}
    output = ""
    try:
        # the node asks for its token: a driver without token mode gets one line saying so
        refused = subprocess.run(
            command, env=without_token, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert refused.stderr.strip().splitlines()[-1].startswith("error: --address")
        assert "RAY_AUTH_MODE=token" in refused.stderr
        sweep = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            deadline = time.monotonic() + SWEEP_TIMEOUT_S
            while sweep.poll() is None and time.monotonic() < deadline:
                try:
                    for gauge in ("ray_softteacher_step", "ray_softteacher_images_per_s"):
                        if gauge not in found and (series := _query(port, gauge)):
                            found[gauge] = series
                except OSError:
                    pass  # Prometheus still starting
                if len(found) == 2:
                    break
                time.sleep(2.0)
        finally:
            sweep.kill()
            output = sweep.communicate()[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(found) == 2, output[-3000:] + (tmp_path / "prometheus.log").read_text()[-2000:]
    step = found["ray_softteacher_step"][0]
    assert step["metric"]["run"]  # one series a run, tagged with its name
    assert float(step["value"][1]) >= 1
