"""Paillier keys are >= 3072 bits, 128-bit security (issue 32, item 9): a 2048-bit modulus (~112-bit) is refused.

The threat model promises >= 128-bit security for every parameter set; 2048-bit moduli used to be accepted by the
model, the client and the server's key registration. Each path is checked with real phe keys on the shipped
covid-cxr head, and the command line refuses ``--key-bits 2048`` with one line naming the bound.
"""

import pytest
from phe import paillier

from medhe.cli import main
from medhe.errors import SecurityError
from medhe.he import compile_model
from medhe.he.paillier import wire
from medhe.he.paillier.client import PaillierClient
from medhe.he.security import PAILLIER_MIN_KEY_BITS, paillier_security_bits
from medhe.models.artifact import load_artifact


@pytest.fixture(scope="module")
def server():
    return compile_model(load_artifact("covid-cxr"), "paillier", pool_size=0)


def test_default_and_floor_are_128_bit(server):
    spec = server.spec()
    assert spec["params"]["key_bits"] == 3072 and spec["params"]["min_key_bits"] == 3072 == PAILLIER_MIN_KEY_BITS
    assert server.report_params()["security_bits"] == paillier_security_bits(3072) == 128


def test_a_2048_bit_model_is_refused_naming_the_bound():
    with pytest.raises(SecurityError) as err:
        compile_model(load_artifact("covid-cxr"), "paillier", key_bits=2048)
    message = str(err.value)
    assert "2048" in message and "3072" in message and "128-bit" in message and "112" in message
    assert len(message.splitlines()) == 1


def test_a_client_refuses_a_spec_asking_for_2048_bits(server):
    spec = server.spec()
    forged = dict(spec, params=dict(spec["params"], key_bits=2048, min_key_bits=2048))
    with pytest.raises(SecurityError, match="3072"):
        PaillierClient(forged)


def test_the_server_refuses_a_real_2048_bit_public_key(server):
    public, _ = paillier.generate_paillier_keypair(n_length=2048)
    assert public.n.bit_length() == 2048
    msg = wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(public.n), [public.n])
    with pytest.raises(SecurityError, match="below medhe's 128-bit floor of 3072 bits"):
        server.load_keys(wire.dumps(msg, 256))
    ok, _ = paillier.generate_paillier_keypair(n_length=3072)  # the same path accepts the floor itself
    assert server.load_keys(wire.dumps(wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(ok.n), [ok.n]), 384))


def test_evaluate_with_2048_bit_keys_is_one_line(capsys):
    assert main(["evaluate", "--model", "covid-cxr", "--scheme", "paillier", "--key-bits", "2048", "--limit", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "3072" in err[0] and "Traceback" not in err[0], err


def test_service_limits_take_the_floor_from_the_model_never_2048(server):
    """The upload rules' ``min_key_bits`` fell back to 2048 for a spec without one (and copied a forged 2048);
    it is now the spec's own floor, never below 128-bit, listed in ``limits`` and checked from the key message's
    header, so a 2048-bit key is refused before it is spooled."""
    from medhe.errors import MedheError
    from medhe.he.paillier.limits import paillier_rules
    from medhe.service import limits
    from medhe.service.upload import StreamCheck

    rules = limits.rules_for(server)
    assert rules["min_key_bits"] == server.spec()["params"]["min_key_bits"] == PAILLIER_MIN_KEY_BITS
    spec = server.spec()
    bare = dict(spec, params={k: v for k, v in spec["params"].items() if k != "min_key_bits"})
    forged = dict(spec, params=dict(spec["params"], min_key_bits=2048))
    higher = dict(spec, params=dict(spec["params"], min_key_bits=4096))
    assert paillier_rules(bare, 0)["min_key_bits"] == PAILLIER_MIN_KEY_BITS
    assert paillier_rules(forged, 0)["min_key_bits"] == PAILLIER_MIN_KEY_BITS
    assert paillier_rules(higher, 0)["min_key_bits"] == 4096
    assert limits.describe(rules, None, 1 << 30)["min_key_bits"] == PAILLIER_MIN_KEY_BITS
    weak, _ = paillier.generate_paillier_keypair(n_length=2048)
    data = wire.dumps(wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(weak.n), [weak.n]), 256)
    check = StreamCheck(rules, "keys", "the key upload")
    with pytest.raises(MedheError) as err:
        check.feed(data[:64])  # the header alone decides
    assert err.value.status == 422 and err.value.code == "rejected" and "3072-bit floor" in str(err.value)
    ok, _ = paillier.generate_paillier_keypair(n_length=3072)
    data = wire.dumps(wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(ok.n), [ok.n]), 384)
    check = StreamCheck(rules, "keys", "the key upload")
    check.feed(data)
    check.finish()
