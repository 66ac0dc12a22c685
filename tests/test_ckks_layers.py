"""Every HE-friendly layer encrypted at once: RGB input, two convolutions (one grouped, one strided), average
pooling, a residual block, squeeze-and-excitation (ciphertext x ciphertext gate) and a dense head, on real
RetinaMNIST images. The logits must match the torch forward pass of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medhe.he.ckks import CKKSClient, compile_plan
from medhe.he.ckks.server import CKKSServerModel
from medhe.he.ckks.compiler.trace import run_plain, trace
from medhe.models.layers import HESqueezeExcite, PolyAct, Residual


def every_layer_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), PolyAct((0.1, 0.5, 0.1)),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.AvgPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))),
        HESqueezeExcite(4, reduction=2),
        nn.Flatten(), nn.Linear(4 * 7 * 7, 5))
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def retina_images(data_dir, n: int) -> np.ndarray:
    with np.load(data_dir / "retinamnist.npz") as d:
        images = d["test_images"][:n]  # (n, 28, 28, 3) uint8
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)


def test_every_layer_traces_to_the_torch_function(data_dir):
    model = every_layer_model()
    x = retina_images(data_dir, 1)
    graph = trace(model, x.shape[1:])
    assert {n.op for n in graph.nodes} == {"input", "linear", "poly", "add", "mul"}
    want = model(torch.from_numpy(x)).detach().double().numpy()[0]
    assert np.abs(run_plain(graph, x[0])[-1] - want).max() < 1e-5


@pytest.mark.slow
def test_every_layer_runs_encrypted(data_dir):
    model = every_layer_model()
    images = retina_images(data_dir, 1)
    server = CKKSServerModel(compile_plan(model, images.shape[1:]), labels=list("abcde"))
    summary = server.plan.summary()
    assert "gate3" in [i.op for i in server.plan.instrs] and "add" in [i.op for i in server.plan.instrs]
    client = CKKSClient(server.spec())
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    with torch.no_grad():
        want = model(torch.from_numpy(images)).double().numpy()
    got = client.decrypt(server.infer(keys, client.encrypt(images[0])))
    assert np.abs(got - want[0]).max() < 1e-2, summary
