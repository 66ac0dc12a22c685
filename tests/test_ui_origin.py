"""The clinician's page answers only its own page (issue 32, items 4 and 15), checked on a real ``medhe ui``
process on 127.0.0.1 in front of a real ``medhe serve`` (pneumoniamnist, CKKS), with httpx as the other pages:

- Host and Origin must be the page's own scheme, host *and port*: another port of 127.0.0.1, ``localhost:1``,
  https, ``null`` and foreign names are refused with 403 before a byte of the body is read;
- every state-changing call needs the page's token (written into its index.html) and its route's content type:
  text/plain and form bodies, which any web page can send without a CORS preflight, are refused;
- huge scans are refused from their header, and the scan store is bounded by bytes, not only by count;
- an unusual scan is not diagnosed unless the page asks for it, and its result is then marked unreliable.
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from medhe.data import load_dataset
from medhe.service.launch import ServerProcess, free_port

from test_inputs_hardening import huge_png

pytestmark = pytest.mark.slow  # a server, a page process and real CKKS (CI runs it)

WAIT = 90
STORE_MB = 16  # the page's scan store for this module (default 512 MB): a few 4 MB scans fill it


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["pneumoniamnist"], workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    """``medhe ui`` as a clinician starts it, in its own process: (its URL, its port, the process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medhe", "ui", "--server", server.url, "--port", str(port),
                             "--scan-store-mb", str(STORE_MB)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, port, proc
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def token(page) -> str:
    html = httpx.get(page[0] + "/", timeout=10).text
    found = re.search(r'<meta name="medhe-page-token" content="([A-Za-z0-9_-]{40,})">', html)
    assert found, "the page carries its token"
    return found.group(1)


@pytest.fixture(scope="module")
def radiograph(data_dir) -> bytes:
    img = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images[2]
    return png_bytes(np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC)))


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def own(url: str, token: str, kind: str = "application/octet-stream", **extra) -> dict[str, str]:
    """The headers the page itself sends: its origin, its token, the route's content type."""
    return {"Origin": url, "X-Medhe-Page-Token": token, "Content-Type": kind, **extra}


def add_scan(page, token, content: bytes, name: str = "scan.png", **headers) -> httpx.Response:
    url = page[0]
    return httpx.post(f"{url}/api/scans?model=pneumoniamnist", content=content, timeout=60,
                      headers={**own(url, token, **{"X-Filename": name}), **headers})


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_only_the_pages_own_host_and_origin_are_answered(page, token, radiograph):
    url, port, _ = page
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert httpx.get(f"{url}/api/models", headers={"Host": host}, timeout=30).status_code == 200, host
    for host in ("127.0.0.1:1", "localhost:1", f"127.0.0.1:{port + 1}", "evil.example", f"evil.example:{port}",
                 "127.0.0.1"):
        answer = httpx.get(f"{url}/api/models", headers={"Host": host}, timeout=30)
        assert answer.status_code == 403, host
        assert answer.json()["error"].startswith(f"medhe ui answers only its own page (http://127.0.0.1:{port}/)")
    # another port of this machine (or localhost:1) is another program: its pages may not add scans
    for origin in ("http://127.0.0.1:1", "http://localhost:1", f"http://127.0.0.1:{port + 1}",
                   f"https://127.0.0.1:{port}", "null", "https://evil.example", f"http://localhost:{port}"):
        answer = add_scan(page, token, radiograph, Origin=origin)
        assert answer.status_code == 403, origin
        assert "medhe ui answers only its own page" in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert add_scan(page, token, radiograph).status_code == 200  # the page itself
    same = add_scan(page, token, radiograph, Host=f"localhost:{port}", Origin=f"http://localhost:{port}")
    assert same.status_code == 200  # the page opened as http://localhost:PORT/ is the same page


def test_state_changes_need_the_page_token_and_their_content_type(page, token, radiograph):
    url, _, _ = page
    scans = f"{url}/api/scans?model=pneumoniamnist"
    for headers in ({"Origin": url, "Content-Type": "application/octet-stream"},  # no token
                    own(url, "x" * 43), own(url, token[:-1]), {"Content-Type": "text/plain"}):
        answer = httpx.post(scans, content=radiograph, headers=headers, timeout=30)
        assert answer.status_code == 403 and "no valid page token" in answer.json()["error"], headers
    # bodies a foreign page can send without a CORS preflight: refused even with the token
    for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x"):
        answer = httpx.post(scans, content=radiograph, headers=own(url, token, kind), timeout=30)
        assert answer.status_code == 415 and "application/octet-stream" in answer.json()["error"], kind
        job = httpx.post(f"{url}/api/jobs", content=b'{"scan": "x", "model": "pneumoniamnist"}',
                         headers=own(url, token, kind), timeout=30)
        assert job.status_code == 415 and "application/json" in job.json()["error"], kind
    no_token = httpx.post(f"{url}/api/jobs", json={"scan": "x", "model": "pneumoniamnist"},
                          headers={"Origin": url}, timeout=30)
    assert no_token.status_code == 403
    # reading stays open to the page (GET needs no token); the page's own script sends the token it was given
    assert httpx.get(f"{url}/api/models", headers={"Origin": url}, timeout=30).status_code == 200
    script = httpx.get(f"{url}/static/app.js", timeout=10).text
    assert '"X-Medhe-Page-Token": PAGE_TOKEN' in script


def test_huge_scans_are_refused_and_the_store_is_bounded_by_bytes(page, token, tmp_path):
    url, _, proc = page
    bomb = huge_png(tmp_path / "huge.png", 12000, 12000).read_bytes()  # 140 KB, 144 megapixels
    before = rss_mb(proc.pid)
    for i in range(4):
        answer = add_scan(page, token, bomb, name=f"huge-{i}.png")
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error.startswith(f"cannot read image huge-{i}.png: it declares 144 megapixels, more than the 40")
    assert rss_mb(proc.pid) - before < 100  # nothing was decoded (the old page grew by ~170 MB per file)
    # 1200x1200 RGB scans, 4.3 MB each decoded: six exceed the 16 MB store, so the oldest are dropped (the old
    # store kept 64 scans whatever their size)
    big = np.zeros((1200, 1200, 3), dtype=np.uint8)
    big[..., 0] = np.linspace(0, 255, 1200, dtype=np.uint8)[None, :]
    big[..., 1] = np.linspace(0, 255, 1200, dtype=np.uint8)[:, None]
    content = png_bytes(big)
    ids = []
    for i in range(6):
        answer = add_scan(page, token, content, name=f"big-{i}.png")
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    kept = (STORE_MB << 20) // big.nbytes
    assert 1 < kept < len(ids)
    for i, scan_id in enumerate(ids):
        answer = httpx.get(f"{url}/api/scans/{scan_id}?model=pneumoniamnist", timeout=60)
        assert answer.status_code == (200 if i >= len(ids) - kept else 422), (i, answer.text)
    assert "no longer held" in httpx.get(f"{url}/api/scans/{ids[0]}?model=pneumoniamnist", timeout=60).text
    # a scan larger than the whole store: one clear line
    huge = add_scan(page, token, png_bytes(np.zeros((2400, 2400, 3), dtype=np.uint8)), name="whole.png")
    assert huge.status_code == 422
    assert huge.json()["error"].startswith("whole.png needs 17 MB decoded, more than the page keeps")


def wait_job(url: str, job: dict) -> dict:
    deadline = time.monotonic() + WAIT
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = httpx.get(f"{url}/api/jobs/{job['id']}", timeout=30).json()
    return job


def test_unusual_scans_are_refused_unless_asked_and_then_marked_unreliable(page, token, radiograph):
    url, _, _ = page
    assert 'id="allow-unusual"' in httpx.get(url + "/", timeout=10).text
    tiny = add_scan(page, token, png_bytes(np.full((1, 1), 128, dtype=np.uint8)), name="tiny.png").json()
    assert tiny["warnings"] and "1x1 pixels" in tiny["warnings"][0]
    jobs = f"{url}/api/jobs"
    refused = httpx.post(jobs, json={"scan": tiny["id"], "model": "pneumoniamnist"},
                         headers=own(url, token, "application/json"), timeout=30)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error.startswith("tiny.png looks unlike the model's training data") and "nothing was sent" in error
    assert 'Diagnose unusual scans anyway' in error and "\n" not in error
    bad = httpx.post(jobs, json={"scan": tiny["id"], "model": "pneumoniamnist", "allow_unusual": "yes"},
                     headers=own(url, token, "application/json"), timeout=30)
    assert bad.status_code == 400
    job = httpx.post(jobs, json={"scan": tiny["id"], "model": "pneumoniamnist", "allow_unusual": True},
                     headers=own(url, token, "application/json"), timeout=30).json()
    job = wait_job(url, job)
    assert job["state"] == "done", job["error"]
    assert job["result"]["unreliable"] is True and job["result"]["warnings"] == tiny["warnings"]
    real = add_scan(page, token, radiograph, name="real.png").json()
    assert real["warnings"] == []
    job = wait_job(url, httpx.post(jobs, json={"scan": real["id"], "model": "pneumoniamnist"},
                                   headers=own(url, token, "application/json"), timeout=30).json())
    assert job["state"] == "done" and job["result"]["unreliable"] is False and job["result"]["warnings"] == []
