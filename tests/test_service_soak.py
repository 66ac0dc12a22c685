"""A short soak (issue 32): ``medhe bench --service --soak`` on a real server with all three schemes at once.

The ten-minute run is a benchmark (docs/results.md); this is the same code for ~30 s with read timeouts of 2-3 s,
so that every kind of client runs several times: SDK clients of CKKS, Paillier and TFHE whose every decrypted
answer must equal the plaintext model's, uploads abandoned mid-body, bodies sent slowly within the timeout (must be
answered right), stalled or trickled past it (408) and request heads never finished (408). Asserted: the JSON's
invariants, i.e. nothing wrong, nothing lost, the web process and the workers within docs/service.md's bounds
computed from the server's own limits, the spool empty at the end, no key set or temp folder left behind.
"""

import json

import pytest

from medhe.cli import main

pytestmark = pytest.mark.slow  # starts a server with a CKKS, a Paillier and a TFHE model (CI runs it)

SECONDS = 30


@pytest.fixture(scope="module")
def soak(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    rc = main(["bench", "--service", "--soak", str(SECONDS), "--workers", "1", "--header-timeout", "2",
               "--body-timeout", "3", "--data-dir", str(data_dir), "--json", str(out)])
    report = json.loads(out.read_text())
    return rc, report


def test_the_soak_holds_its_invariants(soak):
    rc, report = soak
    assert report["broken"] == [] and report["ok"] is True and rc == 0, report["broken"]
    assert (report["wrong"], report["lost"], report["unexpected"]) == (0, 0, 0), report["failure_examples"]
    assert report["spool"]["files_at_end"] == []
    assert report["tmp_left_after_stop"] == []
    assert report["keys_left_after_clients_deleted"] == 0
    assert all(report["bounds_held"].values()), report["bounds_held"]
    mem = report["memory"]
    assert max(mem["web_peak_mib"], mem["web_hwm_mib"]) <= mem["web_bound_mib"]
    assert max(mem["worker_hwm_each_mib"].values()) <= mem["worker_bound_each_mib"]
    assert mem["samples"] >= SECONDS // 2 and report["server_log_tracebacks"] == 0


def test_every_kind_of_client_ran(soak):
    _, report = soak
    requests = report["requests"]
    for scheme in ("ckks", "paillier", "tfhe"):
        assert requests[f"{scheme}_sdk"].get("right", 0) >= 2, requests
    assert requests["abandon_keys"]["abandoned"] >= 3 and requests["abandon_infer"]["abandoned"] >= 3
    assert requests["slow_infer"].get("right", 0) >= 1  # slow but within the timeout: answered, and right
    timed_out = sum(v.get("408_body_timeout", 0) for k, v in requests.items() if k.startswith(("stall", "trickle")))
    assert timed_out >= 2
    # the bound is the documented one, from the server's reported limits
    terms = report["memory"]["web_bound_terms_mib"]
    limits = report["server"]
    assert terms["bodies"] == pytest.approx(limits["max_uploads"] * 2 * max(
        m["input_bytes"] for m in limits["models"].values()) / 2**20, abs=0.1)
