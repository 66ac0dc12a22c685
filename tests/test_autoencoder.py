"""VQ autoencoders of the latent pipeline: shapes per factor, deterministic encoder, codebook, quality metrics, I/O."""

import json

import numpy as np
import pytest
import torch

from medhe.errors import ArtifactError
from medhe.models import train_autoencoder as ta
from medhe.models.autoencoder import FACTORS, LATENT_CHANNELS, VQAutoencoder, build_encoder
from medhe.models.zoo import build_model


@pytest.fixture(scope="module")
def nih_images(data_dir):
    return ta.load_images(str(data_dir), splits=("test",), with_covid=False)[:8]


@pytest.mark.parametrize("factor", FACTORS)
def test_shapes_per_factor(factor):
    """P1's latent shapes: f2 128x128x2, f4 64x64x3, f8 32x32x4, f16 16x16x8; reconstruction at input size."""
    torch.manual_seed(0)
    ae = VQAutoencoder(factor).train()
    x = torch.rand(2, 1, 256, 256) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, LATENT_CHANNELS[factor], 256 // factor, 256 // factor)
    recon, vq_loss = ae(x)
    assert recon.shape == x.shape and vq_loss.ndim == 0
    zq, _, idx = ae.quantizer(z)
    assert idx.shape == (2, 256 // factor, 256 // factor)
    # the quantised latent is made of codewords (straight-through only changes the gradient)
    codes = ae.quantizer.codebook[idx].permute(0, 3, 1, 2)
    assert torch.allclose(zq, codes, atol=1e-6)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    ae = VQAutoencoder(16).train()
    x = torch.rand(2, 1, 64, 64)
    recon, vq_loss = ae(x)
    ((recon - x).abs().mean() + vq_loss).backward()
    assert ae.encoder[0].weight.grad is not None and ae.encoder[0].weight.grad.abs().sum() > 0


def test_encoder_is_deterministic_and_rebuilds_from_the_zoo(nih_images):
    """Same scan -> same latent: alone or in a batch, twice, and after rebuilding from card kwargs + weights."""
    torch.manual_seed(1)
    ae = VQAutoencoder(8).eval()
    x = ta.to_tensor(nih_images[:4])
    with torch.no_grad():
        a = ae.encode(x)
        b = ae.encode(x)
        single = ae.encode(x[2:3])
        enc = build_model("vq-encoder", **ae.encoder_kwargs())
        enc.load_state_dict(ae.encoder.state_dict())
        c = enc.eval()(x)
    assert torch.equal(a, b)
    assert torch.allclose(single[0], a[2], atol=1e-5)
    assert torch.equal(a, c)
    assert isinstance(build_encoder(factor=8, num_outputs=14, image_size=32), torch.nn.Module)


def test_unknown_factor_is_rejected():
    with pytest.raises(ValueError, match="factor"):
        VQAutoencoder(3)


def test_ssim_and_psnr_behave():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    assert torch.allclose(ta.ssim(x, x), torch.ones(2), atol=1e-5)
    small, large = x + 0.01 * torch.randn_like(x), x + 0.2 * torch.randn_like(x)
    assert (ta.psnr(small, x) > ta.psnr(large, x)).all()
    assert (ta.ssim(small, x) > ta.ssim(large, x)).all()
    assert abs(float(ta.psnr(x + 0.1, x)[0]) - 20.0) < 1e-3  # MSE 0.01 on [0, 1] is 20 dB


def test_train_save_load_roundtrip(tmp_path, nih_images):
    ae, record = ta.train_autoencoder(16, epochs=1, images=nih_images, crop=64, batch_size=4, max_minutes=None,
                                      log=lambda m: None)
    assert record["epochs"] == 1 and np.isfinite(record["history"][0]["loss"])
    metrics = ta.evaluate_reconstruction(ae, nih_images[:4])
    assert metrics["n_images"] == 4 and np.isfinite(metrics["psnr"]) and -1 <= metrics["ssim"] <= 1
    ta.save_autoencoder(tmp_path / "ae", ae, metrics={"held_out": metrics}, training=record)
    loaded, card = ta.load_autoencoder(tmp_path / "ae")
    x = ta.to_tensor(nih_images[:2])
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), ae.encode(x))
        assert torch.equal(loaded.reconstruct(x), ae.reconstruct(x))
    assert card["latent_shape"] == [8, 16, 16] and card["encoder"]["arch"] == "vq-encoder"
    png = ta.save_recon_grid(ae, nih_images[:3], tmp_path / "grid.png")
    from PIL import Image
    assert Image.open(png).size == (3 * 256, 2 * 256)


def test_load_autoencoder_errors_are_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="train one with medhe train-autoencoder"):
        ta.load_autoencoder(tmp_path)
    (tmp_path / ta.CARD).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match="format"):
        ta.load_autoencoder(tmp_path)


@pytest.mark.slow
def test_cli_train_autoencoder(tmp_path, data_dir, capsys):
    from medhe.cli import main

    out = tmp_path / "vq"
    rc = main(["train-autoencoder", "--factor", "16", "--epochs", "1", "--limit", "6", "--out", str(out),
               "--data-dir", str(data_dir), "--recon-png", str(tmp_path / "r.png")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["factor"] == 16 and "psnr" in report and "ssim" in report
    assert (out / ta.WEIGHTS).is_file() and (tmp_path / "r.png").is_file()
    card = json.loads((out / ta.CARD).read_text())
    assert card["training"]["command"].startswith("medhe") and card["training"]["n_train_images"] == 6


def test_shipped_f8_encoder_is_small():
    """The shipped f8 autoencoder (the client's encoder) stays under 10 MB."""
    from medhe.models.artifact import PRETRAINED_DIR

    path = PRETRAINED_DIR / "vq-f8" / ta.WEIGHTS
    assert path.stat().st_size < 10 * 2 ** 20
    ae, card = ta.load_autoencoder("vq-f8")
    assert ae.factor == 8 and card["latent_shape"] == [4, 32, 32]
    assert card["metrics"]["held_out"]["psnr"] > 20
