"""Links into the MLflow UI that the sweep prints for its runs."""

from __future__ import annotations

DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where ``mlflow ui`` listens by default


def ui_runs_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment.

    ``workflowType`` is part of the link because MLflow 3's UI opens every experiment on its
    GenAI pages (traces, latency) until the user switches to "Model training", whatever the
    experiment's kind tag says (seen in MLflow 3.17 in Chromium).
    """
    base = ui_url.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """One line saying how to open the sweep's runs in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {ui_runs_url(tracking_uri, experiment_id)}"
    return (
        f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}, then "
        f"{ui_runs_url(DEFAULT_UI_URL, experiment_id)}"
    )
