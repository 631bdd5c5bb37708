"""Start or join the Ray cluster a sweep runs on, with the dashboard and Train's state view."""

from __future__ import annotations

import os

import ray
import torch

from softteacher.run.spec import WorkerResources
from softteacher.tune.monitor import DEFAULT_PROMETHEUS_HOST, PROMETHEUS_HOST_ENV

DASHBOARD_HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DASHBOARD_PORT = 8265
# Environment every Ray process of the sweep needs: the dashboard's Train view lists runs
# only with state tracking on, and Ray Data's progress bars would flood the sweep's log.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Ray Train's controller checks on its workers every 2 s by default and takes a few
    # checks to see them finish and stop them: 4.9-5.0 s from the train function's return
    # to fit()'s on 2 cores, 1.0-1.2 s at 0.5 s with the preemption watcher off too (the
    # two not measured apart; README, "Platform overhead")
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# A cluster of the sweep's own is this machine, none of whose nodes is drained or
# preempted: Ray Train's preemption watcher (an actor process a run starts) has nothing
# to watch there. On a joined cluster (spot instances) it stays on.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_or_join(
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard_port: int | None = None,
    dashboard_host: str = DASHBOARD_HOST,
) -> str | None:
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a local cluster whose
    dashboard listens on ``dashboard_host``:``dashboard_port`` (127.0.0.1:8265;
    ``choose_dashboard_port`` finds a free port first). Returns the dashboard URL, if any.
    A dashboard on another address than loopback is said in one line: it accepts jobs
    (code to run) from whoever reaches it with the cluster's token.

    A local cluster gets twice as many logical CPUs as the machine has cores unless told
    otherwise: the Ray Data actors that decode and augment mostly wait, and with logical
    CPUs equal to cores a trial's driver, its Train worker and its data actors cannot all be
    scheduled on a 2-core machine (the run would hang forever).

    Worker output stays in the workers' log files (the dashboard's Logs tab, or
    ``/tmp/ray/session_latest/logs``): the sweep's terminal shows one line a trial event.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    env = sweep_env(joins=bool(address))
    os.environ.update(env)
    if ray.is_initialized():
        return _dashboard_url(None)
    runtime_env = {"env_vars": env}
    if address:
        try:
            context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as error:
            if not _is_auth_error(error):
                raise
            # `ray start` turns token authentication on; a driver sends the token only in
            # token mode, which Ray reads from the environment when it is imported
            raise ClusterAuthError(
                f"--address {address}: the cluster asks for its token; rerun with "
                "RAY_AUTH_MODE=token in the environment (the token is read from "
                "~/.ray/auth_token; `ray get-auth-token` prints it)"
            ) from None
    else:
        if dashboard_host not in LOOPBACK_HOSTS:
            print(
                f"warning: --dashboard-host {dashboard_host}: the dashboard accepts jobs from "
                "any machine that reaches it and sends the cluster's token (~/.ray/auth_token); "
                "keep that token secret and the port behind a firewall"
            )
        # the dashboard's Metrics tab asks this Prometheus (experiments/monitor.py starts it)
        os.environ.setdefault(PROMETHEUS_HOST_ENV, DEFAULT_PROMETHEUS_HOST)
        # "local": a cluster of this sweep's own, even when another sweep's is running
        # (without it, ray.init joins the newest cluster on the machine and refuses num_cpus)
        context = ray.init(
            address="local",
            num_cpus=num_cpus or 2 * (os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host=dashboard_host,
            dashboard_port=dashboard_port or DASHBOARD_PORT,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    return _dashboard_url(context)


def sweep_env(joins: bool) -> dict[str, str]:
    """The environment of the sweep's Ray processes (``WORKER_ENV``, and
    ``LOCAL_CLUSTER_ENV`` on a cluster of its own); a value the user set is kept."""
    wanted = WORKER_ENV if joins else WORKER_ENV | LOCAL_CLUSTER_ENV
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


class ClusterAuthError(ConnectionError):
    """A cluster that refuses this driver for want of its authentication token."""


def _is_auth_error(error: BaseException) -> bool:
    """Whether ``error`` or an exception it chains is Ray's missing-token refusal (which
    reaches ``ray.init``'s caller as text inside a chained RuntimeError)."""
    while error is not None:
        if isinstance(error, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(
            error
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _dashboard_url(context: object | None) -> str | None:
    url = getattr(context, "dashboard_url", None) if context is not None else None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def default_preset_and_resources(
    preset_name: str | None,
    *,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    max_failures: int = 2,
) -> tuple[str, WorkerResources]:
    """What fold_sweep.py picks when the command line leaves it open: with a GPU the paper
    preset and one GPU (and one CPU) a worker; without, the cpu preset and one core a
    worker, so that a 2-core machine trains two trials at once (measured: two 1-thread
    trainings give 1.36x the images/s of one 2-thread training at the cpu preset's size),
    each trial's one worker in the trial's own process (Ray Train's start costs 26 s a
    trial more on 2 cores; a GPU trial gets a ``TorchTrainer`` worker)."""
    gpu = torch.cuda.is_available()
    if workers is None:
        workers = 1 if gpu else 0
    name = preset_name or ("paper" if gpu else "cpu")
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpu else 0.0)
    cpus = cpus_per_worker or 1.0
    return name, WorkerResources(
        num_workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus, max_failures=max_failures
    )
