"""Train's reports forwarded to the Tune trial, without Ray's polled queue.

Ray's ``TuneReportCallback`` hands each report to the trial through a ``ray.util.queue``
that the trial polls with a short timeout; every poll that finds it empty is a
``_QueueActor.get`` task failing with ``Empty``, a few a second a trial, and the dashboard
shows hundreds of failed tasks within minutes of a sweep's start. Here the Train
controller appends each report to a small actor and the trial drains it twice a second
with a call that returns a (possibly empty) list, so nothing fails. A run in the trial's
own process (``--workers 0``) reports from a thread of that process: its relay is a list
there, with no actor to start and poll.
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


class ActorRelay:
    """A ``ReportRelay`` actor behind calls that wait: the relay of a Ray Train run, whose
    controller runs in another process (it is pickled there with the callback)."""

    def __init__(self) -> None:
        self._actor = ReportRelay.remote()

    def put(self, report: dict[str, Any]) -> None:
        ray.get(self._actor.put.remote(report))

    def drain(self) -> list[dict[str, Any]]:
        return ray.get(self._actor.drain.remote())

    def close(self) -> None:
        ray.kill(self._actor)


class LocalRelay:
    """The relay of a run in the trial's own process: the reports in a list, under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: list[dict[str, Any]] = []

    def put(self, report: dict[str, Any]) -> None:
        with self._lock:
            self._reports.append(report)

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            reports, self._reports = self._reports, []
        return reports

    def close(self) -> None:
        """A list: nothing to end."""


class RelayToTune(UserCallback):
    """Runs in the Train controller (or the in-process session): rank 0's metrics of each
    report, into the relay."""

    def __init__(self, relay: ActorRelay | LocalRelay) -> None:
        self._relay = relay

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self._relay.put(dict(metrics[0]))


def fit_reporting_to_tune(
    fit: Callable[[list[UserCallback]], T],
    annotate: Callable[[dict[str, Any]], dict[str, Any] | None] = dict,
    *,
    in_process: bool = False,
) -> T:
    """Call ``fit(callbacks)`` (a run or a multi-stage run) and ``tune.report`` each report
    it makes, as ``annotate`` returns it (None: not forwarded), in order, from this trial's
    own thread, as they arrive. ``in_process``: the run reports from this process."""
    relay = LocalRelay() if in_process else ActorRelay()
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
            for report in relay.drain():
                forwarded = annotate(report)
                if forwarded is not None:
                    tune.report(forwarded)
            if ended:
                break
    finally:
        relay.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
