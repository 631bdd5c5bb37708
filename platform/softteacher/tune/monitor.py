"""Prometheus on a sweep's Ray cluster, so the project's gauges (step, images/s, teacher mAP,
pseudo boxes, loss) can be charted while trials train.

Ray writes a scrape config into each session folder (``metrics/prometheus/prometheus.yml``,
whose targets file lists the nodes' metrics ports); this starts a Prometheus binary on it
(Debian: ``apt install prometheus``), as ``ray metrics launch-prometheus`` would after
downloading one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PROMETHEUS_PORT = 9090
DEFAULT_SESSION = Path("/tmp/ray/session_latest")
# the dashboard reads these when the cluster starts (tune/cluster.py sets the first)
PROMETHEUS_HOST_ENV = "RAY_PROMETHEUS_HOST"
DEFAULT_PROMETHEUS_HOST = f"http://127.0.0.1:{PROMETHEUS_PORT}"


class MonitorError(RuntimeError):
    """Prometheus cannot be started as asked (no binary, no Ray session to scrape)."""


def scrape_config(session_dir: Path = DEFAULT_SESSION) -> Path:
    """The Prometheus config Ray wrote for the session (the latest one by default)."""
    session = Path(session_dir).resolve()
    config = session / "metrics" / "prometheus" / "prometheus.yml"
    if not config.is_file():
        raise MonitorError(
            f"{config} not found; start the sweep first (its cluster writes it), or pass "
            "--session /tmp/ray/session_<...> of a cluster started with the dashboard"
        )
    return config


def prometheus_binary(binary: str | None = None) -> str:
    found = binary or shutil.which("prometheus")
    if not found:
        raise MonitorError(
            "no prometheus binary on PATH; install it (Debian: apt install prometheus) or "
            "pass --prometheus PATH"
        )
    return found


def start_prometheus(
    config: Path,
    storage_dir: Path,
    port: int = PROMETHEUS_PORT,
    binary: str | None = None,
    log_file: Path | None = None,
) -> subprocess.Popen:
    """Prometheus scraping with ``config`` on 127.0.0.1:``port``, its data in
    ``storage_dir``; the caller stops it (``terminate``)."""
    storage_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "w") if log_file else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [
            prometheus_binary(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={storage_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
