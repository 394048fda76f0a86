"""End to end: ``metalab-ui`` serves the project's store and a browser shows a training run.

A small store is written with metalab.tracking (the metric names the train stage logs),
the UI is started exactly as documented (``metalab-ui``, here as ``python -m metalab.ui``
so no PATH is needed) on a free loopback port, and headless Chromium, driven by selenium,
opens the experiment and the run page. Without chromium/chromedriver the test is skipped,
except under CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from metalab.schema import TrackingConfig
from metalab.tracking import stage_run

pytestmark = pytest.mark.slow

SERVER_START_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 30
EXPERIMENT_NAME = "metalab"
RUN_NAME = "train tiny"
UNDER_CI = os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> None:
    """Skip for a missing browser piece; under CI a missing piece is a broken setup: fail."""
    message = f"{what} not found (install: apt-get install chromium chromium-driver)"
    if UNDER_CI:
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


def find_binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    missing(" / ".join(names))
    raise AssertionError("unreachable")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def no_proxy_open(url: str, timeout: float) -> int:
    """HTTP status of `url`, never through a proxy (the server is on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status


def js_number(value: float) -> str:
    """`value` as the UI (JavaScript) prints it: 32.0 -> '32'."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@pytest.fixture
def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver, checked before any slow setup."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing("the selenium package")
    chromium = find_binary("chromium", "chromium-browser", "google-chrome")
    chromedriver = find_binary("chromedriver")
    return chromium, chromedriver


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A store holding the experiment `metalab` with one finished training run; returns the
    store URI and the run id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run(
        "train@tiny",
        {"train": {"meta_lr": 0.001}},
        TrackingConfig(experiment_name=EXPERIMENT_NAME),
        tags={"experiment": "tiny", "stage_kind": "train"},
    ) as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.meter.add_tasks(64, seconds=2.0)  # tasks_per_s = 32
    return uri, run.run_id


@pytest.fixture
def ui_server(store: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    """The documented UI command on a free loopback port, in its own process group (the
    server forks workers); the whole group is killed afterwards. Yields the base URL."""
    uri, _ = store
    port = free_loopback_port()
    log_path = tmp_path / "mlflow_ui.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "metalab.ui", "--port", str(port)],
            cwd=tmp_path,
            env=os.environ | {"MLFLOW_TRACKING_URI": uri},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"UI server exited ({server.returncode}):\n{log_path.read_text()}")
            try:
                if no_proxy_open(f"{base}/health", timeout=2) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"UI server not answering after {SERVER_START_TIMEOUT_S} s:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield base
    finally:
        stop_process_group(server)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Workers may outlive the leader briefly; make sure none of the group survives.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def browser(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",  # small /dev/shm in containers
        "--disable-gpu",
        "--no-proxy-server",
        "--window-size=1600,1200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",  # fresh UI state every time
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def page_lines(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [line.strip() for line in driver.find_element(By.TAG_NAME, "body").text.splitlines()]


def wait_for_text(driver: Any, *texts: str) -> None:
    """Wait until every one of `texts` is a whole line of the rendered page (React renders
    asynchronously after the page has loaded)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, PAGE_TIMEOUT_S).until(
        lambda current: all(text in page_lines(current) for text in texts),
        message=f"never showed all of {texts}",
    )


def value_after(lines: list[str], label: str) -> str:
    """The line after `label`: the UI's metric table renders name, then value."""
    return lines[lines.index(label) + 1]


def test_ui_shows_experiment_run_and_resource_metrics(
    browser_paths: tuple[str, str],
    store: tuple[str, str],
    ui_server: str,
    browser: Any,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    uri, run_id = store
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
    metrics = client.get_run(run_id).data.metrics
    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)
    artifacts = Path(os.environ.get("METALAB_TEST_ARTIFACTS", tmp_path))
    try:
        # The experiment list, then the experiment itself.
        browser.get(f"{ui_server}/#/experiments")
        link = wait.until(expected_conditions.element_to_be_clickable((By.LINK_TEXT, "metalab")))
        link.click()
        wait.until(expected_conditions.url_contains(f"/experiments/{experiment_id}"))
        # Its runs table (the experiment's default tab depends on the UI's GenAI/Model
        # training switch, so open the runs tab by URL) and from there the run page.
        browser.get(f"{ui_server}/#/experiments/{experiment_id}/runs")
        wait.until(expected_conditions.element_to_be_clickable((By.LINK_TEXT, RUN_NAME))).click()
        wait.until(expected_conditions.url_contains(f"/experiments/{experiment_id}/runs/{run_id}"))
        wait_for_text(browser, EXPERIMENT_NAME, RUN_NAME, "tasks_per_s", "peak_memory_mb")
        lines = page_lines(browser)
        assert value_after(lines, "tasks_per_s") == "32"
        assert value_after(lines, "peak_memory_mb") == js_number(metrics["peak_memory_mb"])
        assert "Finished" in lines
    except Exception:
        artifacts.mkdir(parents=True, exist_ok=True)
        screenshot = artifacts / "mlflow_ui_failure.png"
        browser.save_screenshot(str(screenshot))
        print(f"screenshot of the failing page: {screenshot} (URL {browser.current_url})")
        raise
