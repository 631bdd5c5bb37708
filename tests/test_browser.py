"""What a user sees of a sweep in a real browser: a smoke sweep submitted as a Ray Job to a
local cluster, then the Ray dashboard's job page and the MLflow UI's runs table, models
column and artifacts, opened in headless Chromium.

Skipped without Chromium (Debian: ``apt install chromium``; or set ``CHROMIUM``) or the
playwright package (``pip install -e .[browser]``; ``make browser-check`` does both the
install and the run). With ``SOFTTEACHER_SCREENSHOTS=docs`` the README's screenshots are
taken by the same code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import HeadNode, free_port
from mlflow.tracking import MlflowClient

from softteacher.track.ui import ui_runs_url

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser checks need playwright: pip install -e .[browser]"
)
CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
if CHROMIUM is None:
    pytest.skip("no Chromium (apt install chromium, or set CHROMIUM)", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = os.environ.get("SOFTTEACHER_SCREENSHOTS")
SWEEP_NAME = "browser-smoke"
JOB_TIMEOUT_S = 900


@dataclass(frozen=True)
class SubmittedSweep:
    """A finished smoke sweep that ran as a Ray Job on a cluster still up."""

    dashboard_url: str
    auth_token: str
    submission_id: str
    driver_log: str
    results_dir: Path


def _wait_for_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@pytest.fixture(scope="module")
def submitted_sweep(
    ray_head_node: HeadNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubmittedSweep]:
    """The README's ``ray job submit --working-dir . -- python experiments/fold_sweep.py``,
    through the same job API, for a smoke sweep with its baseline."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = tmp_path_factory.mktemp("browser-sweep")
    token = ray_head_node.auth_token
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 120
    while True:  # the dashboard, then its job agent, come up seconds after the node
        try:
            client = JobSubmissionClient(ray_head_node.dashboard_url, headers=headers)
            submission_id = client.submit_job(
                entrypoint=(
                    f"{sys.executable} experiments/fold_sweep.py --preset smoke --ratios 10 "
                    f"--folds 1 --baseline --name {SWEEP_NAME} "
                    f"--results-dir {work / 'results'} --data-dir {work / 'data'}"
                ),
                runtime_env={"working_dir": str(ROOT)},
            )
            break
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(submission_id)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-3000:]
        time.sleep(2.0)
    log = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, log[-3000:]
    yield SubmittedSweep(
        ray_head_node.dashboard_url, token, submission_id, log, work / "results"
    )


@pytest.fixture(scope="module")
def mlflow_ui(submitted_sweep: SubmittedSweep) -> Iterator[str]:
    """``mlflow ui`` on the sweep's store, as the README starts it."""
    port = free_port()
    store = f"sqlite:///{submitted_sweep.results_dir / 'mlflow.db'}"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_http(url, timeout_s=120)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name))


def test_the_sweep_ran_as_a_ray_job_and_printed_its_table(submitted_sweep):
    log = submitted_sweep.driver_log
    assert log.count("[done]") == 2
    assert f"{SWEEP_NAME}_table.md" in log
    assert "MLflow UI:" in log and "workflowType=machine_learning" in log


def test_the_dashboard_shows_the_sweep_job_and_its_driver_log(submitted_sweep, browser):
    context = browser.new_context(
        viewport={"width": 1280, "height": 1000},  # down to the driver's log
        extra_http_headers={"Authorization": f"Bearer {submitted_sweep.auth_token}"},
    )
    page = context.new_page()
    page.goto(f"{submitted_sweep.dashboard_url}/#/jobs")
    row = page.locator("tr", has_text=submitted_sweep.submission_id)
    sync_api.expect(row).to_contain_text("fold_sweep.py", timeout=30_000)
    sync_api.expect(row).to_contain_text("SUCCEEDED")
    page.goto(f"{submitted_sweep.dashboard_url}/#/jobs/{submitted_sweep.submission_id}")
    # the driver's log is on the job page; its keyword filter finds a trial's end
    page.get_by_label("Keyword").first.fill("[done]", timeout=30_000)
    done = page.get_by_text(re.compile(r"10% fold 1 soft_teacher_jitter .* teacher mAP")).first
    sync_api.expect(done).to_be_visible(timeout=30_000)
    _screenshot(page, "ray_dashboard_job.png")
    context.close()


def test_the_mlflow_runs_table_shows_the_sweep_its_trials_map_and_data(
    submitted_sweep, mlflow_ui, browser
):
    client = MlflowClient(f"sqlite:///{submitted_sweep.results_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fold_sweep")
    runs = client.search_runs([experiment.experiment_id])
    children = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert len(children) == 2

    page = browser.new_page(viewport={"width": 1600, "height": 600})  # up to the mAP column
    # the link the sweep prints: without workflowType the UI opens on its GenAI pages
    page.goto(ui_runs_url(mlflow_ui, experiment.experiment_id))
    names = page.locator('.ag-cell[col-id="attributes.`Run Name`"]')
    sync_api.expect(names.first).to_contain_text(SWEEP_NAME, timeout=30_000)
    page.get_by_role("button", name="Close").click()  # the assistant's panel
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # children
    for child in children:
        sync_api.expect(names.filter(has_text=child)).to_have_count(1)
    datasets = page.locator('.ag-cell[col-id="attributes.`Dataset`"]')
    sync_api.expect(datasets.filter(has_text="10% fold 1 labeled")).to_have_count(2)
    models = page.locator('.ag-cell[col-id="attributes.`Models`"]')
    sync_api.expect(models.filter(has_text="r10-f1-")).to_have_count(2)
    # the teacher's final mAP as a column, picked as a user does in "Columns"
    page.get_by_role("button", name="Columns").first.click()
    page.get_by_placeholder("Search columns").fill("final/teacher/AP")
    title = re.compile(r"^final/teacher/AP$")
    column = page.locator("[class*='tree-title']").filter(has_text=title)
    column.click()
    page.keyboard.press("Escape")
    teacher_ap = page.locator('.ag-cell[col-id="metrics.`final/teacher/AP`"]')
    sync_api.expect(teacher_ap).to_have_count(3)  # the parent's cell is empty
    values = [text.strip() for text in teacher_ap.all_inner_texts()]
    assert sum(1 for v in values if v.replace(".", "", 1).isdigit()) == 2, values
    _screenshot(page, "mlflow_runs.png")
    page.close()


def test_a_trial_run_shows_its_overlay_pngs_in_artifacts(submitted_sweep, mlflow_ui, browser):
    client = MlflowClient(f"sqlite:///{submitted_sweep.results_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fold_sweep")
    soft = client.search_runs(
        [experiment.experiment_id], "params.method = 'soft_teacher_jitter'"
    )[0]
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(
        f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{soft.info.run_id}"
        "/artifacts?workflowType=machine_learning"
    )
    page.get_by_text("overlays", exact=True).first.click(timeout=30_000)
    first_png = page.get_by_text(".png", exact=False).first
    first_png.click()
    image = page.locator("img[src^='blob:']").first
    sync_api.expect(image).to_be_visible(timeout=30_000)
    assert image.evaluate("element => element.naturalWidth") >= 100
    page.close()


def test_the_sweep_run_shows_compare_plots_in_artifacts(
    submitted_sweep, mlflow_ui, browser, tmp_path
):
    """``compare.py --plot`` on the sweep's store, as the README runs it: its PNGs in the
    sweep's parent run, under plots/ of the Artifacts tab."""
    store = f"sqlite:///{submitted_sweep.results_dir / 'mlflow.db'}"
    compared = subprocess.run(
        [
            sys.executable, str(ROOT / "experiments" / "compare.py"), "--tracking-uri", store,
            "--plot", "--out", str(tmp_path / "plots"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout[-2000:] + compared.stderr[-2000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("fold_sweep")
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`mlflow.parentRunId` IS NULL"
    )
    assert f"logged {len(list((tmp_path / 'plots').glob('*.png')))} plot(s)" in compared.stdout
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(
        f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
        "/artifacts?workflowType=machine_learning"
    )
    page.get_by_text("plots", exact=True).first.click(timeout=30_000)
    page.get_by_text(".png", exact=False).first.click()
    image = page.locator("img[src^='blob:']").first
    sync_api.expect(image).to_be_visible(timeout=30_000)
    assert image.evaluate("element => element.naturalWidth") >= 100
    page.close()
