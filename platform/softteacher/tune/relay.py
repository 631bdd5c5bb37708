"""Train's reports forwarded to the Tune trial, without Ray's polled queue.

Ray's ``TuneReportCallback`` hands each report to the trial through a ``ray.util.queue``
that the trial polls with a short timeout; every poll that finds it empty is a
``_QueueActor.get`` task failing with ``Empty``, a few a second a trial, and the dashboard
shows hundreds of failed tasks within minutes of a sweep's start. Here the Train
controller appends each report to a small actor and the trial drains it twice a second
with a call that returns a (possibly empty) list, so nothing fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray import tune
from ray.train.v2.api.callback import UserCallback

T = TypeVar("T")
POLL_S = 0.5


@ray.remote(num_cpus=0)
class ReportRelay:
    """The reports a run made that its Tune trial has not forwarded yet."""

    def __init__(self) -> None:
        self._reports: list[dict[str, Any]] = []

    def put(self, report: dict[str, Any]) -> None:
        self._reports.append(report)

    def drain(self) -> list[dict[str, Any]]:
        reports, self._reports = self._reports, []
        return reports


class RelayToTune(UserCallback):
    """Runs in the Train controller: rank 0's metrics of each report, into the relay."""

    def __init__(self, relay: ray.actor.ActorHandle) -> None:
        self._relay = relay

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        ray.get(self._relay.put.remote(dict(metrics[0])))


def fit_reporting_to_tune(
    fit: Callable[[list[UserCallback]], T],
    annotate: Callable[[dict[str, Any]], dict[str, Any] | None] = dict,
) -> T:
    """Call ``fit(callbacks)`` (a run or a multi-stage run) and ``tune.report`` each report
    it makes, as ``annotate`` returns it (None: not forwarded), in order, from this trial's
    own thread, as they arrive."""
    relay = ReportRelay.remote()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fit([RelayToTune(relay)])
        except BaseException as error:  # re-raised in the trial's thread below
            outcome["error"] = error

    worker = threading.Thread(target=target, name="fit", daemon=True)
    worker.start()
    try:
        while True:
            worker.join(POLL_S)
            ended = not worker.is_alive()  # read before draining: no report is left behind
            for report in ray.get(relay.drain.remote()):
                forwarded = annotate(report)
                if forwarded is not None:
                    tune.report(forwarded)
            if ended:
                break
    finally:
        ray.kill(relay)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
