"""Scale-out on Ray, end to end on a real local cluster: a head and a second node started here with ``ray start`` on
loopback addresses, ``medhe serve --ray`` (a real HTTP server on 127.0.0.1), the SDK with real CKKS encryption, a
node killed mid-run, and ``medhe score --ray`` on a folder of real test images. Every Ray process the cluster
started is killed at the end (fixture finalizer), whatever happened.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.data import load_dataset, read_image
from medhe.models.artifact import load_artifact
from medhe.models.predict import model_inputs, predict_logits
from medhe.service.launch import ServerProcess
from medhe.service.loadtest import run_load_test

pytest.importorskip("ray", reason='Ray is the optional extra: pip install -e ".[ray]" (make test installs it)')

from medhe.service.raycluster import LocalCluster, alive_nodes, connect, disconnect  # noqa: E402

pytestmark = pytest.mark.slow  # starts Ray nodes and a server, runs real CKKS (CI runs it)

N_IMAGES = 24


def _local_cluster():
    """Head on 127.0.0.2 and a second node on 127.0.0.3, one CPU and a small object store each; stopped even if
    the test fails."""
    c = LocalCluster(nodes=2, cpus_per_node=1, object_store_bytes=128 << 20, timeout=120)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not any(node.pids() for node in c.nodes)


class _Shared:
    """The cluster the tests that leave it whole share (starting one costs ~12 s); one cluster at a time, since two
    would both want 127.0.0.2/3 and Ray's fixed ports."""

    run = None  # the _local_cluster generator while its cluster is up
    cluster: LocalCluster | None = None

    @classmethod
    def get(cls) -> LocalCluster:
        if cls.run is None:
            run = _local_cluster()
            cls.cluster, cls.run = next(run), run
        return cls.cluster

    @classmethod
    def stop(cls) -> None:
        run, cls.run, cls.cluster = cls.run, None, None
        if run is not None:
            run.close()  # runs the generator's finally: every node process killed


@pytest.fixture(scope="module", autouse=True)
def _shared_cluster_stops_with_the_module():
    yield
    _Shared.stop()
    assert _Shared.run is None


@pytest.fixture()
def cluster():
    """The shared cluster, handed to each test with both nodes alive and both CPUs free: the previous test's
    server took its actors with it when its driver left, which takes a moment."""
    import time

    shared = _Shared.get()
    ray = connect(shared.address)
    try:
        deadline = time.monotonic() + 60
        while len(alive_nodes()) != 2 or ray.available_resources().get("CPU", 0) < 2:
            assert time.monotonic() < deadline, "the shared Ray cluster did not come back to 2 nodes with 2 free CPUs"
            time.sleep(0.3)
    finally:
        disconnect()
    return shared


@pytest.fixture()
def own_cluster():
    """A cluster of the test's own, for tests that kill or add nodes (the next test must not get a degraded one)."""
    _Shared.stop()
    yield from _local_cluster()


@pytest.fixture(scope="module")
def plain(data_dir):
    """Real test images and the plaintext model's predictions for them."""
    artifact = load_artifact("pneumoniamnist")
    images = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images[:N_IMAGES]
    logits = predict_logits(artifact.model, model_inputs(artifact, images))
    return images, logits.argmax(1), artifact


def _actor_pids(cluster: LocalCluster) -> list[int]:
    """Processes Ray titled ``ray::KeyActor...`` (one per live actor of ``medhe serve --ray``) among ``cluster``'s
    own: another Ray cluster on this machine (a benchmark running alongside) has actors of its own."""
    import os

    ours = {pid for node in cluster.nodes for pid in node.pids()}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) not in ours:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::KeyActor"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def _nice(pid: int) -> int:
    import os

    return os.getpriority(os.PRIO_PROCESS, pid)


def test_cluster_has_two_loopback_nodes(cluster):
    ray = connect(cluster.address)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert sorted(n["NodeManagerAddress"] for n in nodes) == ["127.0.0.2", "127.0.0.3"]
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        disconnect()


def test_sdk_diagnoses_through_serve_ray_equal_plain_inference(cluster, plain):
    images, expected, _ = plain
    with ServerProcess(["pneumoniamnist"], extra_args=["--ray", cluster.address], startup_timeout=240) as srv:
        import httpx

        ready = httpx.get(f"{srv.url}/v1/ready", timeout=10).json()
        assert ready["workers"] == 2  # one actor per cluster CPU: one on each node
        # the actors do the inference: they run at a plain worker's priority, not Ray's default niceness 15 (Ray
        # adds its niceness to what the nodes inherit: this process's, 0 unless the tests run under `nice`)
        base = _nice(0)
        assert sorted(_nice(pid) for pid in _actor_pids(cluster)) == [base, base]
        # ciphertexts and results travel inline in the calls, not through the object stores (raylets' CPU)
        inline = f"RAY_max_direct_call_object_size={4 << 20}".encode()
        for pid in _actor_pids(cluster):  # (the web process sets it in its own environment before ray.init)
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert inline in f.read().split(b"\0"), pid
        result = run_load_test(srv.url, None, clients=4, requests=N_IMAGES, images=images, expected=expected,
                               images_per_client=N_IMAGES // 4)
    assert result["failures"] == 0 and result["errors"] == []
    assert result["mismatches"] == 0 and result["completed"] == N_IMAGES
    assert result["retries"] == 0


def test_http_batch_mode_through_serve_ray_equals_plain_inference(cluster, plain, tmp_path):
    """``medhe predict --batch`` against ``serve --ray``: the encrypted batch is evaluated in a Ray actor."""
    pytest.importorskip("medhe.he.ckks._batch", reason="batch kernel not built (python setup.py build_ext)")
    images, _, artifact = plain
    root = _folder(tmp_path, images[:8])
    out = tmp_path / "diagnoses.csv"
    with ServerProcess(["pneumoniamnist"], extra_args=["--ray", cluster.address, "--max-batch-bytes", "150M"],
                       startup_timeout=240) as srv:
        assert medhe_main(["predict", "--server", srv.url, "--batch", str(root), "--out", str(out)]) == 0
        log = srv.log()
    rows = list(csv.DictReader(out.open()))
    paths = sorted(root.glob("*.png"))
    plain_logits = predict_logits(artifact.model, model_inputs(artifact, np.stack([read_image(p) for p in paths])))
    assert [r["label"] for r in rows] == [artifact.labels[i] for i in plain_logits.argmax(1)]
    assert "Traceback" not in log


def test_compare_loads_plain_and_ray_in_turns(cluster, data_dir):
    """``bench --service --ray --compare``: both servers up at once, each round loads plain then Ray; the ratio
    reported is the median of the rounds' per-core ratios, and every decrypted answer is checked."""
    import statistics

    from medhe.service.loadtest import _compare

    out = _compare("pneumoniamnist", clients=2, requests=6, data_dir=data_dir, address=cluster.address, cores=2,
                   rounds=2)
    assert [row["round"] for row in out["rounds"]] == [1, 2]
    for row in out["rounds"]:
        for side in ("plain", "ray"):
            assert row[side]["completed"] == 6 and row[side]["mismatches"] == 0
    assert out["failures"] == 0 and out["wrong"] == 0
    assert out["ray_vs_plain"] == statistics.median(out["ray_vs_plain_per_round"]) > 0
    assert out["within_15_percent"] == (out["ray_vs_plain"] >= 0.85)


TWIN = "pneumonia-twin"


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The shipped pneumoniamnist under another card name: a second model that costs as little as the first."""
    import shutil

    from medhe.models.artifact import resolve_model_dir

    path = tmp_path_factory.mktemp("twin") / TWIN
    shutil.copytree(resolve_model_dir("pneumoniamnist"), path)
    card = json.loads((path / "card.json").read_text())
    card["name"] = TWIN
    (path / "card.json").write_text(json.dumps(card))
    return path


def test_replicas_per_model_give_each_model_its_own_actors(cluster, plain, twin):
    """``--ray-replicas pneumoniamnist=1,pneumonia-twin=1`` on 2 CPUs: one actor per model, each compiling and
    holding only its model (as the actors themselves report), the server announcing the same models as without the
    flag, and each model's key sets routed to its own actor (a wrong route fails: the other actor lacks the model).
    The second model is a renamed copy of the first: routing is what is tested, and a second architecture (the
    LeNet-5 of breastmnist, 19 s per image on this CPU) made this test take 6 minutes."""
    import httpx
    from fastapi.encoders import jsonable_encoder

    from medhe.service.catalog import load_catalog
    from medhe.service.raypool import RayPool
    from medhe.service.server import create_app

    images, expected, _ = plain
    models = load_catalog(["pneumoniamnist", str(twin)])
    app = create_app(models, processes=0)  # the same two models served without Ray: what clients must see
    app.state.start()
    app.state.stop()
    plain_listing = json.loads(json.dumps(jsonable_encoder({m.id: m.describe() for m in models})))  # as served

    replicas = ["--ray-replicas", f"pneumoniamnist=1,{TWIN}=1"]
    with ServerProcess(["pneumoniamnist", str(twin)], extra_args=["--ray", cluster.address, *replicas],
                       startup_timeout=300) as srv:
        ready = httpx.get(f"{srv.url}/v1/ready", timeout=10).json()
        assert ready["workers"] == 2 and ready["workers_by_model"] == {"pneumoniamnist": 1, TWIN: 1}
        assert len(_actor_pids(cluster)) == 2  # no default actors: every served model is listed
        listing = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["models"]
        assert {m["id"]: m for m in listing} == plain_listing
        results = [run_load_test(srv.url, "pneumoniamnist", clients=2, requests=8, images=images[:8],
                                 expected=expected[:8], images_per_client=4),
                   run_load_test(srv.url, TWIN, clients=2, requests=8, images=images[8:16],
                                 expected=expected[8:16], images_per_client=4)]
        log = srv.log()
    for result in results:
        assert result["failures"] == 0 and result["errors"] == [], result["errors"]
        assert result["mismatches"] == 0 and result["completed"] == 8 and result["retries"] == 0
    assert f"Ray actors per model: pneumoniamnist 1, {TWIN} 1" in log and "Traceback" not in log

    # A mixed plan, asked of the actors directly: the twin's replica takes one of the 2 CPUs, the default
    # one-per-free-CPU rule puts the unlisted pneumoniamnist on the other; each actor compiled only its model.
    import time

    from medhe.errors import MedheError

    refs = [m.ref for m in models]
    ray = connect(cluster.address)
    try:
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < 2:  # the server's actors leave with its driver
            assert time.monotonic() < deadline, "the server's actors did not release their CPUs"
            time.sleep(0.5)
        with pytest.raises(MedheError, match="all taken by the 2 actor"):  # no CPU left for pneumoniamnist
            RayPool(refs, replicas={TWIN: 2}).start()
        pool = RayPool(refs, replicas={TWIN: 1})
        pool.start()
        try:
            held = sorted(tuple(ray.get(actor.specs.remote(), timeout=60)) for actor in pool._slots)
            assert held == sorted([("pneumoniamnist",), (TWIN,)])
            assert pool.live_by_model() == {"pneumoniamnist": 1, TWIN: 1}
        finally:
            pool.close()
    finally:
        disconnect()


def test_ray_replicas_values_parse_and_check():
    """``--ray-replicas`` as typed: comma lists and the repeated flag merge; bad items are one-line errors."""
    from medhe.cli.serve import parse_replicas
    from medhe.errors import MedheError
    from medhe.service.raypool import check_replicas

    assert parse_replicas(["pneumoniamnist=2, breastmnist=1", "retinamnist=3"]) == {
        "pneumoniamnist": 2, "breastmnist": 1, "retinamnist": 3}
    assert parse_replicas([]) == {}
    for values, words in ((["pneumoniamnist"], "not MODEL=N"), (["pneumoniamnist=x"], "not MODEL=N"),
                          (["=2"], "not MODEL=N"), (["pneumoniamnist=0"], "at least 1"),
                          (["pneumoniamnist=1,pneumoniamnist=2"], "twice"), (["a=1", "a=1"], "twice")):
        with pytest.raises(MedheError, match=words):
            parse_replicas(values)
    served = ["pneumoniamnist", "breastmnist"]
    assert check_replicas({"breastmnist": 2}, served, actors=3) == {"breastmnist": 2}
    with pytest.raises(MedheError, match="'nosuch', which is not served here"):
        check_replicas({"nosuch": 1}, served)
    with pytest.raises(MedheError, match="no default actors"):
        check_replicas({"pneumoniamnist": 1, "breastmnist": 1}, served, per_node=1)


def _folder(tmp_path, images):
    root = tmp_path / "scans"
    root.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(np.asarray(img).reshape(28, 28).astype(np.uint8)).save(root / f"scan{i:03d}.png")
    return root


@pytest.mark.parametrize("mode", ["--single", "--batch"])
def test_score_ray_equals_plain_inference(cluster, plain, tmp_path, mode):
    images, _, artifact = plain
    if mode == "--batch":
        pytest.importorskip("medhe.he.ckks._batch", reason="batch kernel not built (python setup.py build_ext)")
        images = images[:8]  # one full ciphertext set per chunk whatever its fill: keep the uploads few
    root = _folder(tmp_path, images)
    out, stats = tmp_path / "diagnoses.csv", tmp_path / "stats.json"
    assert medhe_main(["score", "--ray", cluster.address, "--model", "pneumoniamnist", str(root), "--out", str(out),
                       "--stats", str(stats), mode]) == 0
    rows = list(csv.DictReader(out.open()))
    paths = sorted(root.glob("*.png"))
    plain_logits = predict_logits(artifact.model, model_inputs(artifact, np.stack([read_image(p) for p in paths])))
    assert [r["source"] for r in rows] == [str(p) for p in paths]
    assert [r["label"] for r in rows] == [artifact.labels[i] for i in plain_logits.argmax(1)]
    z = np.exp(plain_logits - plain_logits.max(1, keepdims=True))
    p_plain = (z / z.sum(1, keepdims=True))[:, 1]
    assert np.max(np.abs(np.array([float(r["p_pneumonia"]) for r in rows]) - p_plain)) < 1e-3
    figures = json.loads(stats.read_text())
    assert figures["mode"] == mode.strip("-") and figures["actors"] == 2 and figures["retries"] == 0
    if mode == "--batch":
        assert figures["chunks"] == 2  # fanned out: one chunk per actor, on both nodes


def test_killing_the_second_node_mid_run_loses_no_diagnosis(own_cluster, plain):
    images, expected, _ = plain
    with ServerProcess(["pneumoniamnist"], extra_args=["--ray", own_cluster.address], startup_timeout=240) as srv:
        killed = []
        result = run_load_test(srv.url, None, clients=4, requests=32, images=images, expected=expected,
                               images_per_client=N_IMAGES // 4, kill_after=6,
                               kill=lambda: killed.append(own_cluster.kill_node()))
        log = srv.log()
    assert killed and killed[0] > 0  # the node's raylet and workers really died
    assert result["failures"] == 0, result["errors"]
    assert result["mismatches"] == 0 and result["completed"] == 32
    assert result["retries"] >= 1  # clients whose keys lived on the dead node re-registered and retried
    assert "keys are forgotten" in log and "Traceback" not in log


def test_a_node_that_joins_gets_its_actors_in_per_node_mode(own_cluster, plain):
    """``--ray-actors-per-node 1``: a third node added while serving gets an actor, which then takes key sets."""
    import time

    import httpx

    images, expected, _ = plain
    with ServerProcess(["pneumoniamnist"], extra_args=["--ray", own_cluster.address, "--ray-actors-per-node", "1"],
                       startup_timeout=240) as srv:
        assert httpx.get(f"{srv.url}/v1/ready", timeout=10).json()["workers"] == 2
        own_cluster.add_node()
        deadline = time.monotonic() + 120
        while httpx.get(f"{srv.url}/v1/ready", timeout=10).json()["workers"] < 3:
            assert time.monotonic() < deadline, "the new node got no actor"
            time.sleep(0.5)
        result = run_load_test(srv.url, None, clients=6, requests=12, images=images, expected=expected)
    assert result["failures"] == 0 and result["mismatches"] == 0


def test_score_ray_survives_a_node_killed_mid_run(own_cluster, plain):
    """The second node dies after the first few images are back: every image is still diagnosed, correctly."""
    from medhe.service.rayscore import score

    images, expected, artifact = plain
    killed = []

    def kill_after_four(done: int) -> None:
        if done >= 4 and not killed:
            killed.append(own_cluster.kill_node())

    connect(own_cluster.address)
    try:
        results, stats = score("pneumoniamnist", images, [f"img{i}" for i in range(len(images))], progress=False,
                               batch=False, on_result=kill_after_four)
    finally:
        disconnect()
    assert killed and killed[0] > 0
    assert [r.label for r in results] == [artifact.labels[i] for i in expected]
    assert stats["retries"] >= 1 and stats["replaced_actors"] >= 1  # the lost actor's image was sent again


def test_without_ray_serve_works_and_ray_flag_names_the_extra(tmp_path, monkeypatch, capsys):
    """A machine without the extra: ``--ray`` is one line naming it (simulated by hiding the module)."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as on a machine without it
    assert medhe_main(["serve", "--model", "pneumoniamnist", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[ray]"' in err[0]
    assert medhe_main(["score", "--ray", "--model", "pneumoniamnist", str(tmp_path)]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_plain_serve_never_imports_ray():
    """``medhe serve`` without --ray (and every other command) works on a machine without the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"
            "import medhe.cli, medhe.cli.serve, medhe.cli.score, medhe.cli.bench, medhe.service.server\n"
            "from medhe.service.catalog import load_catalog\n"
            "from medhe.service.server import create_app\n"
            "app = create_app(load_catalog(['pneumoniamnist']), processes=0)\n"
            "app.state.start(); app.state.stop(); medhe.cli.build_parser(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


RAY_ERROR_CASES = [
    (["score", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "{folder}"], ["no Ray head answers", "127.0.0.9:1"]),
    (["score", "--ray", "not-an-address", "--model", "pneumoniamnist", "{folder}"], ["not host:port"]),
    (["score", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "{folder}/missing"], ["is not a folder"]),
    (["serve", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist"], ["no Ray head answers"]),
    (["serve", "--ray-actors", "2", "--model", "pneumoniamnist"], ["go with --ray"]),
    (["serve", "--ray-replicas", "pneumoniamnist=1", "--model", "pneumoniamnist"], ["--ray-replicas", "go with --ray"]),
    (["serve", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "--ray-replicas", "pneumoniamnist=0"],
     ["--ray-replicas pneumoniamnist=0", "at least 1"]),
    (["serve", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "--ray-replicas", "pneumoniamnist=1",
      "--ray-replicas", "pneumoniamnist=2"], ["--ray-replicas", "twice"]),
    (["serve", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "--ray-replicas", "pneumonia:2"],
     ["--ray-replicas", "MODEL=N"]),
    (["serve", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "--ray-replicas", "breastmnist=1"],
     ["--ray-replicas", "'breastmnist'", "not served"]),
    (["serve", "--ray", "127.0.0.9:1", "--model", "pneumoniamnist", "--ray-replicas", "pneumoniamnist=1",
      "--ray-actors", "2"], ["--ray-replicas lists every served model"]),
    (["bench", "--service", "--ray", "--compare", "--url", "http://127.0.0.1:9"], ["--url"]),
    (["bench", "--service", "--ray", "--compare", "--rounds", "0"], ["--rounds"]),
]


@pytest.fixture(scope="module")
def ray_error_runs(tmp_path_factory):
    """Every RAY_ERROR_CASES command line, run once in one fresh interpreter (tests/cli_cases.py)."""
    from cli_cases import run_cases

    folder = tmp_path_factory.mktemp("errors") / "scans"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "a.png")
    argvs = [[a.replace("{folder}", str(folder)) for a in args] for args, _ in RAY_ERROR_CASES]
    return {tuple(args): proc for (args, _), proc in zip(RAY_ERROR_CASES, run_cases(argvs))}


@pytest.mark.parametrize("args, words", RAY_ERROR_CASES)
def test_ray_user_errors_are_one_line(args, words, ray_error_runs):
    """Bad addresses and options fail fast with one line (Ray alone would retry an unreachable head for minutes)."""
    proc = ray_error_runs[tuple(args)]
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("medhe serve: compiling")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0]


def test_a_killed_owner_leaves_no_ray_node_behind(tmp_path):
    """``ray start`` detaches its processes: if the test or benchmark that started a local cluster is SIGKILLed
    (no finalizer runs), its watchdog still kills every node process."""
    _Shared.stop()  # its cluster takes the same loopback addresses
    import os
    import signal
    import subprocess
    import sys
    import time

    from medhe.service.raycluster import _processes_under

    code = ("import os, signal\n"
            "from medhe.service.raycluster import LocalCluster\n"
            "c = LocalCluster(2, 1).start()\n"
            "print(c.root, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == -signal.SIGKILL
    root = done.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 20
    while (_processes_under(root) or os.path.isdir(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_under(root) and not os.path.isdir(root)
