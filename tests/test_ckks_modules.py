"""Contracts of the CKKS package split: a SEAL-free compiler (its own prime chain, key levels fixed at compile
time), a backend registry the server takes its backend from, and a batch field that defaults to today's plans."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import seal
import torch
from torch import nn

from medhe.errors import PlanError, SecurityError
from medhe.he.ckks import CKKSClient, compile_plan, dump_server, load_server
from medhe.he.ckks.backends import backend_class, get_backend, resolve
from medhe.he.ckks.backends.base import Backend
from medhe.he.ckks.backends.seal import SealBackend, seal_context
from medhe.he.ckks.compiler.keybudget import key_levels_of
from medhe.he.ckks.compiler.params import (PRESETS, CKKSParams, choose_params, coeff_modulus, data_primes,
                                           max_depth, params_for_ring)
from medhe.he.ckks.server import CKKSServerModel
from medhe.he.security import security_bits
from medhe.models.layers import PolyAct


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), PolyAct((0.1, 0.5, 0.1)), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def plan():
    return compile_plan(tiny(), (1, 4, 4))


def seal_primes(n: int, bits: list[int]) -> list[int]:
    return [m.value() for m in seal.CoeffModulus.Create(n, list(bits))]


def reachable_chains() -> set[tuple[int, tuple[int, ...]]]:
    """Every chain the parameter choice can produce (shipped models' chains included), over depths and ranges."""
    chains = set()
    for n in PRESETS:
        for depth in range(1, max_depth(n) + 1):
            for max_abs in (None, 1.0, 30.0, 1e3, 1e6):
                for params in (params_for_ring(n, depth, max_abs), _choose(depth, max_abs, n)):
                    if params is not None:
                        chains.add((params.poly_degree, tuple(params.prime_bits)))
    return chains


def _choose(depth: int, max_abs: float | None, n: int) -> CKKSParams | None:
    try:
        return choose_params(depth, max_abs, poly_degree=n)
    except (PlanError, SecurityError):
        return None


def test_prime_chain_matches_seal_for_every_reachable_chain():
    chains = reachable_chains()
    assert len(chains) > 50
    for n, bits in sorted(chains):
        assert list(coeff_modulus(n, bits)) == seal_primes(n, list(bits)), (n, bits)


@pytest.mark.parametrize("n, bits", [
    (8192, [60, 40, 40, 60]), (8192, [38, 27, 27, 27, 27, 27, 43]), (4096, [30, 20, 30, 20, 36]),
    (16384, [50, 30, 50, 30, 30, 50, 45]), (32768, [60] * 10 + [40, 50, 60]), (8192, [21, 22, 23, 59, 60, 58]),
    (1024, [27]), (2048, [20, 34]),
])
def test_prime_chain_follows_seals_order_with_repeated_sizes(n, bits):
    assert list(coeff_modulus(n, tuple(bits))) == seal_primes(n, bits)


def test_data_primes_are_the_seal_context_primes(plan):
    ctx = seal_context(plan.params)
    assert data_primes(plan.params) == [m.value() for m in ctx.first_context_data().parms().coeff_modulus()]


def test_compiler_never_imports_seal_or_the_server():
    code = ("import sys, torch\n"
            "from torch import nn\n"
            "from medhe.he.ckks.compiler import compile_plan, Plan, CKKSParams, choose_params\n"
            "from medhe.models.layers import PolyAct\n"
            "m = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), PolyAct((0.0, 0.5, 0.1)), nn.Linear(4, 2)).eval()\n"
            "plan = compile_plan(m, (1, 4, 4))\n"
            "assert plan.key_levels is not None and plan.public()['key_levels'] == plan.key_levels\n"
            "bad = sorted(k for k in sys.modules if k == 'seal' or k.startswith('medhe.he.ckks.server')\n"
            "             or k.startswith('medhe.he.ckks.backends.seal'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_key_levels_are_fixed_at_compile_time(plan):
    assert plan.key_levels == key_levels_of(plan)
    assert plan.public()["key_levels"] is plan.key_levels
    assert set(plan.key_levels["galois"]) == {str(s) for s in plan.rotation_steps}


def test_registry_names_and_instances(plan, caplog):
    assert resolve("seal") == "seal"
    assert resolve("auto") in ("native", "seal")
    be = get_backend("seal", plan.params)
    assert isinstance(be, SealBackend) and isinstance(be, Backend) and be.name == "seal"
    assert get_backend(be, plan.params) is be
    with pytest.raises(PlanError, match="unknown CKKS backend 'gpu'"):
        get_backend("gpu", plan.params)
    try:
        backend_class("native")
    except ImportError:
        import medhe.he.ckks.backends as registry

        registry._said_fallback = False
        caplog.clear()
        assert resolve("auto") == "seal" and resolve("auto") == "seal"
        said = [r for r in caplog.records if "native CKKS runtime is not built" in r.getMessage()]
        assert len(said) == 1  # once per process
        with pytest.raises(PlanError, match="backend='seal'"):
            get_backend("native", plan.params)


def test_server_takes_its_backend_and_reports_it(plan):
    server = CKKSServerModel(plan, backend="seal")
    assert server.backend.name == "seal"
    reported = server.report_params()
    assert {k: reported[k] for k in ("backend", "security_bits")} == {"backend": "seal", "security_bits": 128}
    client = CKKSClient(server.spec())
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 4)).astype(np.float32)
    got = client.decrypt(server.infer(keys, client.encrypt(x)))
    want = tiny()(torch.from_numpy(x[None])).detach().double().numpy()[0]
    assert np.abs(got - want).max() < 1e-2
    same = CKKSServerModel(plan, backend=SealBackend(plan.params))
    assert same.plan_id == server.plan_id and same.backend.name == "seal"


def test_security_bits_follow_the_standard_table():
    assert security_bits(8192, [38] + [27] * 5 + [43]) == 128
    assert security_bits(8192, [40, 30, 40]) == 256
    assert security_bits(16384, [60, 60, 60, 60, 60]) == 192
    with pytest.raises(SecurityError):
        security_bits(8192, [60] * 4)


def _rewrite_meta(data: bytes, edit) -> bytes:
    body = data[13:]
    (n,) = struct.unpack_from("<I", body)
    meta = json.loads(body[4:4 + n])
    edit(meta)
    text = json.dumps(meta).encode()
    body = struct.pack("<I", len(text)) + text + body[4 + n:]
    return data[:8] + struct.pack("<BI", data[8], zlib.crc32(body)) + body


def test_plan_files_without_key_levels_or_batch_still_load(plan):
    server = CKKSServerModel(plan, backend="seal")

    def drop(meta):
        meta.pop("key_levels")
        meta.pop("batch")
        for r in meta["registers"]:
            r.pop("batch")

    old = load_server(_rewrite_meta(dump_server(server), drop), backend="seal")
    assert old.plan_id == server.plan_id and old.plan.key_levels == plan.key_levels and old.plan.batch == 1
    assert load_server(dump_server(server), backend="seal").plan.key_levels == plan.key_levels


def test_batch_defaults_to_one_image_and_is_published_only_when_set(plan):
    assert plan.batch == 1 and all(r.layout.batch == 1 for r in plan.registers)
    assert "batch" not in plan.public()["input"]
    from dataclasses import replace

    batched = replace(plan, batch=4096)
    spec = {"scheme": "ckks", **batched.public()}
    assert spec["input"]["batch"] == 4096 and spec["plan_id"] != plan.public()["plan_id"]
    with pytest.raises(PlanError, match="4096 images per ciphertext"):
        CKKSClient(spec)
    server = CKKSServerModel(batched, backend="seal")
    assert load_server(dump_server(server), backend="seal").plan.batch == 4096


def test_one_instruction_table_reads_plan_files_and_refuses_malformed_instructions(plan):
    """The plan file and the encrypted-weight program decode instructions with the same table-checked decoder."""
    from medhe.he.ckks.compiler.instructions import CT_PRODUCTS, INSTRUCTIONS, instr_from_dict, instr_to_dict
    from medhe.he.ckks.encrypted.program import load_program, program_dict

    assert {ins.op for ins in plan.instrs} <= set(INSTRUCTIONS)
    assert plan.summary()["ciphertext_multiplications"] == sum(CT_PRODUCTS[i.op] for i in plan.instrs) > 0
    for ins in plan.instrs:
        assert instr_from_dict(json.loads(json.dumps(instr_to_dict(ins))), len(plan.plains),
                               len(plan.registers)) == ins
    server = CKKSServerModel(plan, backend="seal")
    assert load_server(dump_server(server), backend="seal").plan.instrs == plan.instrs
    assert load_program(json.loads(json.dumps(program_dict(plan))))[0].instrs == plan.instrs
    poly = next(i for i, ins in enumerate(plan.instrs) if ins.op == "poly2")

    def edit(change):
        def run(meta):
            change(meta["instrs"][poly])
        return run

    cases = [(lambda d: d.update(op="cube"), "unknown instruction 'cube'"),
             (lambda d: d.update(srcs=[0, 0]), "reads 2 registers"),
             (lambda d: d["consts"].pop("beta"), "has constants"),
             (lambda d: d["consts"].update(th=0), "has constants"),
             (lambda d: d.update(dst=10 ** 6), "refers to missing data")]
    for change, message in cases:
        with pytest.raises(PlanError, match=message):
            load_server(_rewrite_meta(dump_server(server), edit(change)), backend="seal")
        doc = json.loads(json.dumps(program_dict(plan)))
        change(doc["instrs"][poly])
        with pytest.raises(PlanError, match=message):
            load_program(doc)
