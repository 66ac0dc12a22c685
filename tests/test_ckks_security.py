"""CKKS security floor and depth limits: refusals come as one-line medhe errors, never as SEAL tracebacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medhe.errors import PlanError, SecurityError
from medhe.he.ckks import CKKSClient, compile_plan
from medhe.he.ckks.compiler.params import CKKSParams, choose_params, max_depth
from medhe.he.ckks.server import CKKSServerModel
from medhe.he.security import check_rlwe_128
from medhe.models.layers import PolyAct


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), PolyAct((0.2, 0.5, 0.0)), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("n,bits", [(4096, [40, 40, 40]), (8192, [60, 60, 60, 60]), (16384, [60] * 8)])
def test_parameters_below_128_bits_are_refused(n, bits):
    with pytest.raises(SecurityError, match="below 128-bit security"):
        check_rlwe_128(n, bits)
    with pytest.raises(SecurityError, match=f"limit"):
        compile_plan(tiny(), (1, 4, 4), poly_degree=n, prime_bits=bits)


def test_secure_explicit_parameters_are_accepted():
    params = choose_params(2, poly_degree=8192, prime_bits=[40, 30, 30, 50])
    assert params.depth == 2 and sum(params.prime_bits) <= 218


def test_unknown_ring_degree_is_refused():
    with pytest.raises(SecurityError):
        check_rlwe_128(2048, [30, 30])


def test_client_refuses_an_insecure_spec():
    server = CKKSServerModel(compile_plan(tiny(), (1, 4, 4)))
    spec = server.spec()
    spec["params"] = CKKSParams(8192, (60, 60, 60, 60), 40).__dict__ | {"prime_bits": [60, 60, 60, 60]}
    with pytest.raises(SecurityError, match="below 128-bit"):
        CKKSClient(spec)


def test_too_deep_model_names_depth_needed_and_limit():
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(13):
        layers += [nn.Linear(4, 4), PolyAct((0.1, 0.5, 0.0))]
    layers.append(nn.Linear(4, 2))
    model = nn.Sequential(*layers).eval()
    with pytest.raises(PlanError) as err:
        compile_plan(model, (1, 2, 2))
    msg = str(err.value)
    assert "depth 27" in msg and f"allow depth {max_depth(32768)}" in msg and "\n" not in msg
    assert max_depth(32768) < 27


def test_unsupported_activation_degree_and_unknown_option_are_plan_errors():
    class Quartic(PolyAct):
        def coefficients(self):
            return [0.0, 1.0, 0.0, 0.0, 0.5]

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), Quartic()).eval()
    with pytest.raises(PlanError, match="degree 4"):
        compile_plan(model, (1, 2, 2))
    with pytest.raises(PlanError, match="unknown CKKS option"):
        compile_plan(tiny(), (1, 4, 4), bogus=1)
