"""``medhe ui`` in a real browser: headless Chromium (OS package) driven by Selenium, the page's backend in this
process (so its traffic can be inspected) and a real ``medhe serve`` on 127.0.0.1 serving pneumoniamnist (CKKS).

Screenshots of each state go to the test's folder; with ``MEDHE_UI_SHOTS=DIR`` they are copied there too (the
README's come from ``MEDHE_UI_SHOTS=reports/ui``), so a test run never rewrites tracked files by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.data import load_dataset, read_image
from medhe.service.launch import ServerProcess, free_port

# The SDK's own security test already holds an exact detector for the serialized secret key; reuse it.
from asgi_thread import serving
from dicom_files import write_dicom
from test_service import CapturingTransport, SecretIndex, plain_labels, secret_key_material

pytestmark = pytest.mark.slow  # a server, a browser and real CKKS (CI runs it)

SHOTS = Path(os.environ["MEDHE_UI_SHOTS"]) if os.environ.get("MEDHE_UI_SHOTS") else None
WAIT = 90  # seconds for one browser state; the whole module stays well under two minutes on 2 cores


def _install_chromium() -> str | None:
    """Chromium and its driver from the OS packages; installed here when missing and possible."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install chromium chromium-driver"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, timeout=900)
            if done.returncode != 0:
                return f"apt-get install failed: {done.stderr.decode(errors='replace').strip()[-200:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get did not finish ({exc})"
    return None if shutil.which("chromium") and shutil.which("chromedriver") else "chromium not on PATH"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    reason = _install_chromium()
    if reason:
        pytest.skip(f"headless Chromium is unavailable ({reason}); install the chromium and chromium-driver packages")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1250", "--force-device-scale-factor=1",
                # no traffic beyond 127.0.0.1 (issue 32): no background requests, component updates or sync
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["pneumoniamnist"], workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def capture():
    return CapturingTransport()


@pytest.fixture(scope="module")
def ui(server, capture):
    """The page's backend exactly as ``medhe ui`` builds it, on a free loopback port, its traffic captured."""
    from medhe.ui.app import create_ui_app

    app = create_ui_app(server.url, transport=capture)
    with serving(app, "medhe ui") as url:
        yield app, url


@pytest.fixture(scope="module")
def scans(tmp_path_factory, data_dir):
    """A PNG and a DICOM made from two real test images (enlarged, as a scanner's export would be), a scan too
    small for the model and a text file."""
    folder = tmp_path_factory.mktemp("scans")
    images = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images
    big = [np.asarray(Image.fromarray(images[i]).resize((96, 96), Image.Resampling.BICUBIC)) for i in (0, 3)]
    png = folder / "chest-0001.png"
    Image.fromarray(big[0]).save(png)
    dcm = write_dicom(folder / "chest-0002.dcm", big[1].astype(np.uint16) * 16, bits=12)
    small = folder / "thumbnail.png"
    Image.fromarray(images[5][4:24, 4:24]).save(small)
    text = folder / "notes.txt"
    text.write_text("not an image\n")
    return {"png": png, "dcm": dcm, "small": small, "text": text}


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)

    def shot(driver, name: str) -> None:
        driver.save_screenshot(str(folder / name))
        if SHOTS is not None:
            shutil.copyfile(folder / name, SHOTS / name)

    return shot


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.05)
    error = driver.execute_script("return document.getElementById('error-text').textContent")
    raise AssertionError(f"timed out waiting for {what}; page error: {error!r}")


def drop_file(driver, path: Path) -> None:
    """Drag and drop as the browser delivers it: a ``drop`` event whose DataTransfer holds the file (Selenium
    cannot drag from the desktop, so a temporary file input supplies the File object)."""
    holder = driver.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'drop-source'; "
        "document.body.append(i); return i;")
    holder.send_keys(str(path))
    driver.execute_script(
        "const i = document.getElementById('drop-source'); const dt = new DataTransfer(); "
        "dt.items.add(i.files[0]); i.remove(); const zone = document.getElementById('drop'); "
        "zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true})); "
        "zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));")


def css(driver, selector: str):
    return driver.find_elements("css selector", selector)


def test_page_diagnoses_png_and_dicom_like_medhe_predict(browser, ui, server, scans, shots, capsys):
    app, url = ui
    browser.get(url)
    wait_for(browser, lambda d: css(d, ".model.selected"), "the model list")
    card = css(browser, ".model.selected")[0].text
    assert "pneumoniamnist" in card and "normal, pneumonia" in card and "binary-class" in card
    assert "never sees the scan" in card and "128-bit" in card
    shots(browser, "1-models.png")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(url + "/") for u in loaded), loaded  # nothing from the internet

    css(browser, "#files")[0].send_keys(str(scans["png"]))  # the file picker ...
    wait_for(browser, lambda d: len(css(d, ".scan img.preview")) == 1, "the PNG's preview")
    drop_file(browser, scans["dcm"])  # ... and drag and drop
    wait_for(browser, lambda d: len(css(d, ".scan img.preview")) == 2, "two previews")
    names = [e.text for e in css(browser, ".scan .name")]
    assert names == ["chest-0001.png", "chest-0002.dcm"]
    assert not css(browser, ".warn"), "real radiographs must not be flagged"
    shots(browser, "2-preview.png")

    css(browser, "#diagnose")[0].click()
    wait_for(browser, lambda d: css(d, ".steps li.running"), "a running step", timeout=30)
    shots(browser, "3-progress.png")
    wait_for(browser, lambda d: len(css(d, '.scan[data-state="done"]')) == 2, "both diagnoses")
    shots(browser, "4-diagnosis.png")

    page = browser.execute_script("return window.medhe.results()")
    assert [r["source"] for r in page] == ["chest-0001.png", "chest-0002.dcm"]
    assert page[0]["bytes_sent"] > page[0]["key_bytes"] > 0  # the first scan sent the keys, the second reused them
    for r in page:  # every step happened and was metered
        assert r["eval_ms"] > 0 and r["bytes_sent"] >= r["ciphertext_bytes"] > 0 and r["bytes_received"] > 0
        assert r["threshold"] == 0.5 and set(r["probabilities"]) == {"normal", "pneumonia"}
    shown = [e.get_attribute("data-label") for e in css(browser, ".scan .result")]
    assert shown == [r["label"] for r in page]

    # the same files through `medhe predict --json`, and plain (unencrypted) inference
    capsys.readouterr()
    assert medhe_main(["predict", "--server", server.url, "--json", str(scans["png"]), str(scans["dcm"])]) == 0
    cli = json.loads(capsys.readouterr().out)["results"]
    assert [r["warnings"] for r in cli] == [[], []]  # the CLI runs the page's input checks too
    assert [r["label"] for r in page] == [r["label"] for r in cli]
    assert [r["label"] for r in page] == plain_labels([read_image(scans["png"]), read_image(scans["dcm"])])
    for mine, theirs in zip(page, cli):  # two encryptions of one image: equal up to CKKS noise
        for label, p in mine["probabilities"].items():
            assert abs(p - theirs["probabilities"][label]) < 1e-3, (label, p, theirs)

    csv = browser.execute_script("return window.medhe.toCSV()").splitlines()
    assert csv[0].startswith("source,model,scheme,task,label,positive,p_normal,p_pneumonia,threshold")
    assert [line.split(",")[0] for line in csv[1:]] == ["chest-0001.png", "chest-0002.dcm"]
    exported = json.loads(browser.execute_script("return window.medhe.toJSON()"))
    assert exported["server"] == server.url and [r["label"] for r in exported["results"]] == [r["label"] for r in cli]


def test_unreadable_file_is_one_sentence_and_the_page_stays_usable(browser, ui, scans, shots):
    _, url = ui
    if not css(browser, ".model.selected"):
        browser.get(url)
        wait_for(browser, lambda d: css(d, ".model.selected"), "the model list")
    before = len(css(browser, ".scan"))
    css(browser, "#files")[0].send_keys(str(scans["text"]))
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error banner")
    message = browser.find_element("id", "error-text").text
    assert message == "cannot read image notes.txt: unknown format (use PNG, JPEG, DICOM .dcm or .npy)"
    assert len(css(browser, ".scan")) == before
    shots(browser, "5-error.png")
    # still usable: another scan is accepted and the banner goes away; this one is too small, and the page says so
    css(browser, "#files")[0].send_keys(str(scans["small"]))
    wait_for(browser, lambda d: len(css(d, ".scan")) == before + 1, "a scan after the error")
    assert not browser.find_element("id", "error").is_displayed()
    assert not css(browser, "#diagnose")[0].get_attribute("disabled")
    warning = css(browser, ".scan .warn")[-1].text
    assert warning.startswith("Check: the image is 20x20 pixels, smaller than the model's 28x28 input")
    browser.execute_script("arguments[0].scrollIntoView()", css(browser, ".scan")[-1])
    shots(browser, "6-warning.png")
    # an unusual scan is not diagnosed unless asked for (issue 32); then its result is marked unreliable
    css(browser, "#diagnose")[0].click()
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the refusal")
    refusal = browser.find_element("id", "error-text").text
    assert refusal.startswith("thumbnail.png looks unlike the model's training data") and "anyway" in refusal
    assert css(browser, ".scan")[-1].get_attribute("data-state") == "new"
    css(browser, "#allow-unusual")[0].click()
    css(browser, "#diagnose")[0].click()
    wait_for(browser, lambda d: css(d, '.scan[data-state="done"] .result.is-unreliable'), "the unreliable result")
    marked = css(browser, ".result.is-unreliable")[-1]
    assert marked.get_attribute("data-unreliable") == "true" and "Unreliable:" in marked.text
    assert [e.get_attribute("data-unreliable") for e in css(browser, ".scan .result")][:2] == ["false", "false"]
    browser.execute_script("arguments[0].scrollIntoView()", css(browser, ".scan")[-1])
    shots(browser, "7-unreliable.png")


def test_keys_forgotten_by_the_server_are_sent_again_not_regenerated(ui, scans):
    """Keys expire at the server (idle TTL, restart): the page registers them again through the SDK and shows it."""
    import httpx

    app, url = ui
    diagnoser = app.state.diagnoser
    assert "pneumoniamnist" in diagnoser.keyed, "run with the browser test: no keys yet"
    diagnoser.client.forget_keys()
    token = page_token(httpx.get(url + "/", timeout=30).text)  # what the page's own script sends
    scan = httpx.post(f"{url}/api/scans?model=pneumoniamnist", content=scans["png"].read_bytes(), timeout=30,
                      headers={"X-Filename": "again.png", "X-Medhe-Page-Token": token,
                               "Content-Type": "application/octet-stream"}).json()
    job = httpx.post(f"{url}/api/jobs", json={"scan": scan["id"], "model": "pneumoniamnist"}, timeout=30,
                     headers={"X-Medhe-Page-Token": token}).json()
    deadline = time.monotonic() + WAIT
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = httpx.get(f"{url}/api/jobs/{job['id']}", timeout=30).json()
    steps = {s["id"]: s for s in job["steps"]}
    assert job["state"] == "done", job["error"]
    assert steps["keygen"]["state"] == "reused" and steps["keys"]["state"] == "done"
    assert job["sent"] > steps["keys"]["bytes"] > 0


def test_server_down_unknown_model_and_foreign_pages(server):
    from fastapi.testclient import TestClient

    from medhe.ui.app import create_ui_app

    local = "http://127.0.0.1"
    with TestClient(create_ui_app(f"http://127.0.0.1:{free_port()}"), base_url=local) as page:
        answer = page.get("/api/models")
        assert answer.status_code == 502
        assert answer.json()["error"].startswith("cannot reach the medhe server at http://127.0.0.1:")
    with TestClient(create_ui_app(server.url), base_url=local) as page:
        # only pages of this machine: DNS rebinding (foreign Host) and cross-site requests (foreign Origin) refused
        assert page.get("/api/models", headers={"Host": "evil.example"}).status_code == 403
        foreign = page.post("/api/jobs", json={}, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403 and "answers only its own page" in foreign.json()["error"]
        assert page.get("/api/models", headers={"Origin": local}).status_code == 200
        page.headers["X-Medhe-Page-Token"] = page_token(page.get("/").text)  # as the page's script does
        png = page.post("/api/scans?model=pneumoniamnist", content=checkerboard_png(),
                        headers={"X-Filename": "a.png", "Content-Type": "application/octet-stream"})
        assert png.status_code == 200 and png.json()["warnings"]  # a checkerboard is flagged
        answer = page.post("/api/jobs", json={"scan": png.json()["id"], "model": "nope"})
        assert answer.status_code == 422
        assert answer.json()["error"] == "the server has no model 'nope'; it offers pneumoniamnist"
        # flagged, it is refused by default (issue 32); diagnosed anyway, its scores leave the range the CKKS plan
        # is sized for: a clear refusal, no diagnosis
        refused = page.post("/api/jobs", json={"scan": png.json()["id"], "model": "pneumoniamnist"})
        assert refused.status_code == 422 and "looks unlike the model's training data" in refused.json()["error"]
        job = page.post("/api/jobs", json={"scan": png.json()["id"], "model": "pneumoniamnist",
                                           "allow_unusual": True}).json()
        deadline = time.monotonic() + WAIT
        while job["state"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = page.get(f"/api/jobs/{job['id']}").json()
        assert job["state"] == "failed" and job["result"] is None
        assert job["error"].startswith("a.png: the decrypted scores reach") and "\n" not in job["error"]
        assert [s["state"] for s in job["steps"]][-1] == "failed"


def page_token(html: str) -> str:
    import re

    return re.search(r'<meta name="medhe-page-token" content="([^"]+)">', html).group(1)


def checkerboard_png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_secret_key_never_leaves_the_page_backend(ui, capture):
    """Runs after the browser tests: everything the page's backend sent to the server, with the key it holds."""
    app, _ = ui
    diagnoser = app.state.diagnoser
    assert "pneumoniamnist" in diagnoser.keyed, "run with the browser test: nothing was diagnosed"
    sess = diagnoser.client.session("pneumoniamnist")
    secrets = secret_key_material(sess.he)
    sent = bytes(capture.sent)
    assert len(sent) > sess.key_bytes > 0 and min(len(s) for s in secrets) >= 32
    index = SecretIndex(secrets)
    assert index.found_in(b"\x02" * 5 + secrets[0][100:140])  # the detector works ...
    assert not index.found_in(sent)  # ... and finds nothing in the traffic
    for job in diagnoser.jobs.values():  # decrypted results never go back to the server
        if job.result:
            for v in job.result["logits"]:
                assert repr(v).encode() not in sent and np.float64(v).tobytes() not in sent


def test_medhe_ui_command_serves_the_page(server, tmp_path, capsys):
    """`medhe ui` as a clinician starts it: its own process, the page and the model list answer, Ctrl-C stops it;
    `medhe predict` prints the same input checks as the page."""
    import signal
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medhe", "ui", "--server", server.url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text
        listing = httpx.get(f"http://127.0.0.1:{port}/api/models", timeout=30).json()
        assert [m["id"] for m in listing["models"]] == ["pneumoniamnist"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"open http://127.0.0.1:{port}/ in a browser" in out and "Traceback" not in out

    small = tmp_path / "thumbnail.png"
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8) + np.eye(20, dtype=np.uint8) * 60).save(small)
    assert medhe_main(["predict", "--server", server.url, str(small)]) == 2  # refused by default (issue 32)
    assert "looks unlike the model's training data" in capsys.readouterr().err
    assert medhe_main(["predict", "--server", server.url, "--allow-unusual", str(small)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{small}: ") and lines[1].startswith("  check: the image is 20x20 pixels")
