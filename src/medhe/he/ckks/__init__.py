"""CKKS encrypted inference on Microsoft SEAL: compiler (trace + fold + parameters + packing), client and server.

Public API (``compile`` and ``Client`` are the entries every scheme package has, read by ``medhe.he.scheme``)::

    server = compile_ckks(artifact, **options)   # CKKSServerModel (a medhe.he.scheme.ServerModel), no secret key
    server = compile_plan(model, (C, H, W))      # ... or from a bare torch nn.Sequential: Plan; wrap with
    server = server_from_model(model, (C, H, W)) #     CKKSServerModel(plan) or use this helper
    spec = server.spec()                         # JSON-able public plan: params, input gather map, rotation steps
    client = CKKSClient(spec); client.keygen()   # medhe.he.scheme.ClientSession; secret key stays here
    keys = server.load_keys(client.evaluation_keys())
    logits = client.decrypt(server.infer(keys, client.encrypt(x)))
    layer_errors(server, client, x)              # per-layer max |decrypted - plaintext| (local debugging)
    dump_server(server) / load_server(data)      # compiled model <-> checked bytes

Packages: ``compiler`` (trace, prepare, packing, lower, program, keybudget, params: SEAL-free), ``runtime``
(``run_program`` on any backend), ``backends`` (``base.Backend``, ``seal``, registry ``get_backend``), ``wire``
(envelope, serialize, bits, seeder); then ``server`` / ``client`` (the split), ``planfile``, ``debug``, ``simulate``
(plaintext slot simulator for compiler tests), ``measure`` (JSON timings). Public entry points are imported lazily
so that sibling modules (serialization, benchmarks) can import the package without pulling in the whole compiler.
"""

from __future__ import annotations

from medhe.he.lazy import lazy_exports

SCHEME = "ckks"
DEFAULT_MODEL = "pneumoniamnist"

__all__ = ["SCHEME", "DEFAULT_MODEL", "compile", "Client", "compile_ckks", "compile_plan", "CKKSClient", "CKKSServerModel", "layer_errors", "layer_report",
           "dump_server", "load_server", "server_from_model"]
# (the HOOKS entries of _LAZY below are reached through medhe.he.scheme, not listed as public API)

_LAZY = {
    "compile": ("medhe.he.ckks.server", "compile_ckks"),  # every scheme package's entries (medhe.he.scheme)
    "Client": ("medhe.he.ckks.client", "CKKSClient"),
    "compile_ckks": "medhe.he.ckks.server",
    "CKKSServerModel": "medhe.he.ckks.server",
    "compile_plan": "medhe.he.ckks.compiler.driver",
    "CKKSClient": "medhe.he.ckks.client",
    "layer_errors": "medhe.he.ckks.debug",
    "layer_report": "medhe.he.ckks.debug",
    "server_from_model": "medhe.he.ckks.server",
    "dump_server": "medhe.he.ckks.planfile",
    "load_server": "medhe.he.ckks.planfile",
    # the optional modes of medhe.he.scheme.HOOKS: how the service and the CLI reach CKKS without importing it
    "upload_rules": "medhe.he.ckks.limits",
    "compile_batch": ("medhe.he.ckks.batch.server", "compile_ckks_batch"),
    "BatchClient": ("medhe.he.ckks.batch.client", "CKKSBatchClient"),
    "evaluate_batch": "medhe.he.ckks.batch.evaluate",
    "load_encrypted_model": "medhe.he.ckks.encrypted.model",
    "read_encrypted_card": ("medhe.he.ckks.encrypted.model", "read_public_card"),
    "load_keydir": "medhe.he.ckks.encrypted.keys",
    "KeyHolderClient": "medhe.he.ckks.encrypted.client",
    "make_keydir": "medhe.he.ckks.encrypted.holder",
    "encrypt_model": "medhe.he.ckks.encrypted.holder",
    "KEYDIR_SECRET_FILE": ("medhe.he.ckks.encrypted.keys", "SECRET_FILE"),
    "evaluate_encrypted_model": "medhe.he.ckks.encrypted.evaluate",
    "run_benchmark": ("medhe.he.ckks.bench", "run_ckks_benchmark"),
    "format_benchmark": ("medhe.he.ckks.bench", "format_summary"),
    "run_engine_measurement": ("medhe.he.ckks.measure", "run_measurement"),
    "run_op_costs": "medhe.he.ckks.opcost",
    "run_batch_benchmark": "medhe.he.ckks.batch.bench",
    "add_batch_comparison": ("medhe.he.ckks.batch.bench", "add_comparison"),
    "format_batch_throughput": ("medhe.he.ckks.batch.bench", "format_throughput"),
    "inspect_model": "medhe.he.ckks.inspect",
    "render_inspection": ("medhe.he.ckks.inspect", "render"),
}


__getattr__ = lazy_exports(__name__, _LAZY)
