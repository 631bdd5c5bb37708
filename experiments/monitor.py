"""Chart a running sweep's gauges: Prometheus on its Ray cluster's scrape config.

    python experiments/monitor.py                      # the latest Ray session, port 9090
    python experiments/monitor.py --session /tmp/ray/session_2026-12-02_22-00-00_410313_31433

Then open http://127.0.0.1:9090 and query e.g. ``softteacher_teacher_AP`` or
``softteacher_images_per_s`` (one series a run, tagged ``run``). A sweep started after
this also points the Ray dashboard's Metrics tab at it (``RAY_PROMETHEUS_HOST``).
Ctrl-C stops Prometheus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softteacher.tune.monitor import (
    DEFAULT_SESSION,
    PROMETHEUS_PORT,
    MonitorError,
    scrape_config,
    start_prometheus,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--session", type=Path, default=DEFAULT_SESSION, help="Ray session")
    parser.add_argument("--port", type=int, default=PROMETHEUS_PORT)
    parser.add_argument("--prometheus", default=None, help="the binary (default: on PATH)")
    parser.add_argument(
        "--storage", type=Path, default=Path("experiments/results/prometheus"),
        help="Prometheus's data folder",
    )
    args = parser.parse_args(argv)
    try:
        config = scrape_config(args.session)
        server = start_prometheus(config, args.storage, args.port, args.prometheus)
    except MonitorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Prometheus on http://127.0.0.1:{args.port} scraping {config} (Ctrl-C stops it)")
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
        return 0


if __name__ == "__main__":
    sys.exit(main())
