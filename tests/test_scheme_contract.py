"""Every scheme through the same contract, via the registry only: compile -> spec -> client -> keygen -> encrypt ->
infer -> decrypt, on its shipped default model and real test images (real encryption, no scheme-specific calls)."""

import importlib
import json

import numpy as np
import pytest

from medhe.errors import CiphertextError, PlanError
from medhe.he.scheme import SCHEMES, ClientSession, ServerModel, client_for, compile_model, default_model

#: the only per-scheme knobs: smaller (still >= floor) keys keep the test quick
OPTIONS = {"ckks": {}, "tfhe": {}, "paillier": {"key_bits": 3072}}
SPEC_FIELDS = ("scheme", "format", "model", "task", "labels", "input", "output", "params")


def test_registry_lists_every_scheme_package():
    assert set(SCHEMES) == {"ckks", "tfhe", "paillier"} == set(OPTIONS)
    for scheme in SCHEMES:
        pkg = importlib.import_module(f"medhe.he.{scheme}")
        assert pkg.SCHEME == scheme and {"SCHEME", "DEFAULT_MODEL", "compile", "Client"} <= set(pkg.__all__)
        assert callable(pkg.compile) and issubclass(pkg.Client, ClientSession)
        assert default_model(scheme) == pkg.DEFAULT_MODEL
    with pytest.raises(PlanError, match="choose one of ckks, tfhe, paillier"):
        compile_model(None, "rsa")


def test_every_hook_a_package_declares_resolves_and_a_missing_one_names_the_mode():
    """The optional modes (``HOOKS``) are found without importing them (``has_hook``) and import when used."""
    from medhe.he.scheme import HOOKS, has_hook, scheme_hook

    declared = {scheme: [h for h in HOOKS if has_hook(scheme, h)] for scheme in SCHEMES}
    assert {"compile_batch", "load_encrypted_model", "upload_rules", "run_benchmark"} <= set(declared["ckks"])
    for scheme, hooks in declared.items():
        for name in hooks:
            assert scheme_hook(scheme, name) is not None, (scheme, name)
    with pytest.raises(PlanError, match="scheme 'paillier' has no batch mode"):
        scheme_hook("paillier", "compile_batch")


@pytest.fixture(scope="module", params=SCHEMES)
def compiled(request, data_dir):
    from medhe.data.evalsplit import load_eval_data
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs

    scheme = request.param
    artifact = load_artifact(default_model(scheme))
    _, ds = load_eval_data(artifact, None, "test", 3, str(data_dir))
    server = compile_model(artifact, scheme, **OPTIONS[scheme])
    return scheme, artifact, server, model_inputs(artifact, ds.images)


def _reference(scheme, artifact, server, inputs):
    """What the encrypted computation implements: the quantized integer program for TFHE, the model otherwise."""
    if scheme == "tfhe":
        integer = server.integer
        return integer.dequantize(integer.run(integer.quantize_input(inputs))), 1e-9
    from medhe.models.predict import predict_logits

    return predict_logits(artifact.model, inputs), 0.05


@pytest.mark.slow
def test_compile_spec_client_roundtrip(compiled):
    scheme, artifact, server, inputs = compiled
    assert isinstance(server, ServerModel) and server.scheme == scheme
    spec = json.loads(json.dumps(server.spec()))  # the spec crosses the network as JSON
    assert all(k in spec for k in SPEC_FIELDS) and spec["scheme"] == scheme and spec["model"] == artifact.name
    assert spec["output"]["count"] == len(spec["labels"]) == len(artifact.labels)
    client = client_for(spec)
    assert isinstance(client, ClientSession) and client.scheme == scheme
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    logits = np.stack([client.decrypt(server.infer(keys, client.encrypt(x))) for x in inputs])
    reference, tol = _reference(scheme, artifact, server, inputs)
    assert logits.shape == reference.shape == (len(inputs), spec["output"]["count"])
    assert np.max(np.abs(logits - reference)) <= tol
    params = {**spec["params"], **server.report_params()}
    assert params["library"] and params["backend"] and params["security_bits"] >= 112


@pytest.fixture(scope="module")
def session(compiled):
    """A registered client session of the compiled server: (client, the server's loaded keys)."""
    server = compiled[2]
    client = client_for(server.spec())
    client.keygen()
    return client, server.load_keys(client.evaluation_keys())


@pytest.mark.slow
def test_every_scheme_refuses_foreign_bytes(compiled, session):
    server = compiled[2]
    client, keys = session
    for bad in (b"", b"\x00" * 64, client.evaluation_keys()[:40]):
        with pytest.raises(CiphertextError):
            server.infer(keys, bad)
        with pytest.raises(CiphertextError):
            server.load_keys(bad)


@pytest.mark.slow
def test_ckks_measurement_goes_through_the_shared_loop(data_dir):
    """`medhe bench --scheme ckks --engine-only` (once `python -m medhe.he.ckks.measure`): run_encrypted's figures."""
    from medhe.he.ckks.measure import run_measurement
    from medhe.stats import STAT_KEYS

    result = run_measurement("pneumoniamnist", 3, data_dir=str(data_dir), progress=False)
    assert result["images"] == 3 and result["agreement"] == 1.0 and result["max_abs_logit_error"] < 0.05
    for key in ("encrypt_ms", "load_ms", "eval_ms", "decrypt_ms", "infer_ms", "eval_cpu_ms"):
        assert set(result[key]) == set(STAT_KEYS) and result[key]["n"] == 3
    assert result["eval_ms"]["median"] <= result["infer_ms"]["median"]
    assert result["params"]["security_bits"] >= 128 and result["input_bytes"] > 0


def _bound_to_another(scheme, server):
    """A well-formed input message of ``scheme`` bound to some other model or key."""
    if scheme == "ckks":
        from medhe.he.ckks.wire import envelope

        return envelope.pack(envelope.KIND_INPUT, "ab" * 16, [b"x"])
    if scheme == "tfhe":
        from medhe.he.tfhe import wire

        return wire.pack(wire.KIND_INPUT, b"\1" * 16, b"x")
    from medhe.he.paillier import wire

    return wire.dumps(wire.Message(wire.KIND_FEATURES, b"\1" * 16, [1] * server.dim), 64)


@pytest.mark.slow
def test_one_integrity_helper_names_the_binding(compiled, session):
    scheme, _, server, _ = compiled
    keys = session[1]
    with pytest.raises(CiphertextError, match=r"was made for .+ \(id [0-9a-f]{12}, expected [0-9a-f]{12}\): "):
        server.infer(keys, _bound_to_another(scheme, server))
