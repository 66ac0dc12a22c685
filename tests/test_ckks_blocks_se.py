"""The P1 classifier family across ciphertext blocks, encrypted: conv, pool, SE and the head of a 1x64x64 width-8
``latent_64`` model (N=16384) on SEAL and on the native runtime, within 1e-2 of torch.

A file of its own because SEAL's global memory pool keeps every buffer it allocated until the process ends: the
N=16384 keys and their evaluations take this process to ~7.6 GB, and the rest of test_ckks_blocks.py (a served
multi-block model, the block benchmark) would add to that in one process (tests/suite.py runs each file alone).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medhe.he.ckks import CKKSClient, compile_plan
from medhe.he.ckks.server import CKKSServerModel
from test_ckks_blocks import _x, latent_64


@pytest.fixture(scope="module")
def latent_keys():
    """The N=16384 plan and one client key draw, shared by both backends' runs (keygen is most of their cost)."""
    model = latent_64()
    plan = compile_plan(model, (1, 64, 64))
    client = CKKSClient(json.loads(json.dumps(CKKSServerModel(plan, backend="seal").spec())))
    client.keygen()
    client.key_bytes = client.evaluation_keys()
    return model, plan, client


@pytest.mark.slow  # N=16384 keys: ~35 s with native, ~1 min with SEAL
@pytest.mark.parametrize("backend", ["native", "seal"])
def test_conv_pool_se_and_head_across_blocks_run_encrypted(latent_keys, backend):
    model, plan, client = latent_keys
    srv = CKKSServerModel(plan, backend=backend)
    assert srv.backend.name == backend
    keys = srv.load_keys(client.key_bytes)
    x = _x(3)
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    assert np.abs(client.decrypt(srv.infer(keys, client.encrypt(x))) - want).max() <= 1e-2
