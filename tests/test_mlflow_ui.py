"""End to end: ``metalab-ui`` serves the project's store and a browser shows a training run.

A small store is written with metalab.tracking (the metric names the train stage logs),
the UI is started exactly as documented (``metalab-ui``, here as ``python -m metalab.ui``
so no PATH is needed) from a subfolder of the project on a free loopback port, and
headless Chromium, driven by selenium, opens the experiment and the run page. Without
chromium/chromedriver the test is skipped, except under CI (``CI=true``), where it fails.
Outside a project, or without a store, ``metalab-ui`` exits 1 with one line.
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
from metalab.ui import NoStoreError, find_project_root, store_uri

SERVER_START_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 30
EXPERIMENT_NAME = "metalab"
STAGE = "train@tiny"  # the run is named after it (then " · <commit>")
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
    """A project (``.dvc/``, ``dvc.yaml``) whose store holds the experiment `metalab` with one
    finished training run; returns the store URI and the run id."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run(
        STAGE,
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
    """The documented UI command on a free loopback port, started from a subfolder of the
    project with no MLFLOW_TRACKING_URI (it must find the project's store), in its own
    process group (the server forks workers); the whole group is killed afterwards. Yields
    the base URL."""
    port = free_loopback_port()
    log_path = tmp_path / "mlflow_ui.log"
    subfolder = tmp_path / "notebooks" / "scratch"
    subfolder.mkdir(parents=True)
    unset = ("MLFLOW_TRACKING_URI", "DVC_ROOT")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "metalab.ui", "--port", str(port)],
            cwd=subfolder,
            env={key: value for key, value in os.environ.items() if key not in unset},
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


@pytest.mark.slow
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
    run_name = client.get_run(run_id).info.run_name
    assert run_name.startswith(STAGE)
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
        wait.until(expected_conditions.element_to_be_clickable((By.LINK_TEXT, run_name))).click()
        wait.until(expected_conditions.url_contains(f"/experiments/{experiment_id}/runs/{run_id}"))
        wait_for_text(browser, EXPERIMENT_NAME, run_name, "tasks_per_s", "peak_memory_mb")
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


# ----------------------------------------------------------- which store, from where
def make_project(root: Path, store: bool = True) -> Path:
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    if store:
        (root / "mlflow.db").write_bytes(b"")
    return root


def test_the_store_is_found_from_any_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    project = make_project(tmp_path / "project")
    deep = project / "src" / "metalab" / "deeper"
    deep.mkdir(parents=True)
    assert find_project_root(deep) == project
    assert store_uri(cwd=deep) == f"sqlite:///{project / 'mlflow.db'}"
    # A queued experiment's workspace (a copy with its own .dvc/) leads to the project.
    workspace = make_project(project / ".dvc" / "tmp" / "exps" / "tmp123", store=False)
    assert store_uri(cwd=workspace) == f"sqlite:///{project / 'mlflow.db'}"
    # DVC_ROOT and MLFLOW_TRACKING_URI are respected as by the stages.
    other = make_project(tmp_path / "other")
    monkeypatch.setenv("DVC_ROOT", str(other))
    assert store_uri(cwd=deep) == f"sqlite:///{other / 'mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")
    (project / "runs").mkdir()
    (project / "runs" / "m.db").write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db")
    assert store_uri(cwd=deep) == f"sqlite:///{project / 'runs' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert store_uri(cwd=tmp_path) == "http://127.0.0.1:5001"  # no project needed
    assert store_uri(f"sqlite:///{other / 'mlflow.db'}", cwd=tmp_path).endswith("other/mlflow.db")
    with pytest.raises(NoStoreError, match="no MLflow store at"):
        store_uri("sqlite:///missing.db", cwd=deep)


@pytest.mark.parametrize("where", ["outside", "no store yet"])
def test_without_a_store_the_ui_exits_1_in_one_line(tmp_path: Path, where: str):
    cwd = tmp_path / "somewhere"
    if where == "no store yet":
        make_project(tmp_path, store=False)
    cwd.mkdir()
    unset = ("MLFLOW_TRACKING_URI", "DVC_ROOT")
    result = subprocess.run(
        [sys.executable, "-m", "metalab.ui", "--port", str(free_loopback_port())],
        cwd=cwd,
        env={key: value for key, value in os.environ.items() if key not in unset},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("metalab-ui: ")
    expected = "is not inside a metalab project" if where == "outside" else "no MLflow store at"
    assert expected in result.stderr
    assert not list(tmp_path.rglob("mlflow.db*"))  # no new, empty store
