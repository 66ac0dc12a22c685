"""Train, evaluate, save and load the VQ autoencoders of the latent pipeline (one per downsampling factor).

Training uses unlabeled chest X-rays only: the NIH subset's *train* split plus the COVID subset's *train* split
(resized to 256x256); both datasets' val/test splits stay held out — test images must not be seen even unlabelled —
so the PSNR/SSIM reported here and the test metrics of every classifier on these latents (NIH or COVID) come from
images the autoencoder never saw. It trains on random 128x128 crops (the networks are fully convolutional) because
that is 4x cheaper per step on a CPU, and is evaluated on whole 256x256 images. Loss: L1 + (1 - SSIM) + VQ losses
— no perceptual or adversarial term, since those need downloaded weights or far more compute.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from medhe import atomic
from medhe.errors import ArtifactError, DataError
from medhe.models.autoencoder import LATENT_CHANNELS, VQAutoencoder

FORMAT = "medhe-autoencoder/1"
CARD = "autoencoder.json"
WEIGHTS = "autoencoder.safetensors"
NIH = "nih_chestxray14_subset"
COVID = "covid19_radiography_subset"
IMAGE_SIZE = 256
#: the [0, 255] -> [-1, 1] transform the encoder is trained with; latent model cards record the same.
PREPROCESS = {"channels": 1, "size": IMAGE_SIZE, "crop": "center", "mean": 0.5, "std": 0.5}


# -- data -----------------------------------------------------------------------------------------------------------
def load_images(data_dir: str | None = None, splits: tuple[str, ...] = ("train",), with_covid: bool = True) -> np.ndarray:
    """uint8 (N, 256, 256) grayscale chest X-rays for autoencoder training or evaluation."""
    from medhe.data import load_dataset

    parts = [load_dataset(NIH, split=s, size=IMAGE_SIZE, channels=1, data_dir=data_dir).images for s in splits]
    if with_covid:
        try:
            # only COVID *train*: its val/test splits score covid-cxr-ckks, whose client stage is this encoder
            parts.append(load_dataset(COVID, split="train", size=IMAGE_SIZE, channels=1, data_dir=data_dir).images)
        except DataError:
            pass  # optional extra data: the NIH subset alone still trains a usable autoencoder
    return np.concatenate(parts)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1] (the recorded ``PREPROCESS`` on square images)."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


# -- quality metrics ------------------------------------------------------------------------------------------------
def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float32) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, valid region)."""
    win = _gaussian_window().to(x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x ** 2
    syy = F.conv2d(y * y, win) - mu_y ** 2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


@torch.no_grad()
def reconstruct_all(ae: VQAutoencoder, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Reconstructions through the codebook, uint8 like the input."""
    ae.eval()
    out = []
    for i in range(0, len(images), batch_size):
        r = ae.reconstruct(to_tensor(images[i:i + batch_size]))
        out.append(((r[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    return np.concatenate(out)


@torch.no_grad()
def evaluate_reconstruction(ae: VQAutoencoder, images: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM on [0, 1] images, plus codebook usage."""
    ae.eval()
    ps, ss, codes = [], [], set()
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size])
        z = ae.encoder(x)
        zq, _, idx = ae.quantizer(z)
        r = ((ae.decoder(zq).clamp(-1, 1) + 1) / 2)
        x01 = (x + 1) / 2
        ps.append(psnr(r, x01))
        ss.append(ssim(r, x01))
        codes.update(idx.unique().tolist())
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()),
            "codes_used": len(codes), "n_images": int(len(images))}


def save_recon_grid(ae: VQAutoencoder, images: np.ndarray, path: str | Path, n: int = 6) -> Path:
    """A PNG with originals (top row) over reconstructions (bottom row), for a visual check of the trade-off."""
    from io import BytesIO

    from PIL import Image

    images = images[:n]
    recon = reconstruct_all(ae, images)
    h, w = images.shape[1:3]
    grid = np.zeros((2 * h, len(images) * w), dtype=np.uint8)
    for i, (a, b) in enumerate(zip(images, recon)):
        grid[:h, i * w:(i + 1) * w] = a
        grid[h:, i * w:(i + 1) * w] = b
    buf = BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return atomic.write_bytes(path, buf.getvalue())


# -- training -------------------------------------------------------------------------------------------------------
def _random_crops(images: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    n, h, w = images.shape
    out = np.empty((n, crop, crop), dtype=np.uint8)
    ys = rng.integers(0, h - crop + 1, n)
    xs = rng.integers(0, w - crop + 1, n)
    flips = rng.random(n) < 0.5
    for i in range(n):
        c = images[i, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop]
        out[i] = c[:, ::-1] if flips[i] else c
    return out


def train_autoencoder(factor: int = 8, epochs: int = 15, data_dir: str | None = None, seed: int = 0,
                      batch_size: int = 16, lr: float = 2e-3, crop: int = 128, ssim_weight: float = 0.2,
                      max_minutes: float | None = 30.0, num_codes: int = 256, log=print,
                      images: np.ndarray | None = None) -> tuple[VQAutoencoder, dict[str, Any]]:
    """Train one factor; returns the model and a JSON-able training record (losses, time, data sizes)."""
    if factor not in LATENT_CHANNELS:
        raise DataError(f"--factor {factor} is not supported: use one of {', '.join(map(str, LATENT_CHANNELS))}")
    if epochs < 1:
        raise DataError(f"--epochs must be at least 1, not {epochs}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if images is None:
        images = load_images(data_dir)
    if min(images.shape[1:3]) < crop:
        raise DataError(f"training images are {images.shape[2]}x{images.shape[1]}, smaller than the {crop}px crop")
    ae = VQAutoencoder(factor, num_codes=num_codes)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    start = time.perf_counter()
    history = []
    stopped_early = False
    for epoch in range(epochs):
        ae.train()
        order = rng.permutation(len(images))
        total = 0.0
        for s in range(steps_per_epoch):
            batch = _random_crops(images[order[s * batch_size:(s + 1) * batch_size]], crop, rng)
            x = to_tensor(batch)
            recon, vq_loss = ae(x)
            loss = (recon - x).abs().mean() + vq_loss
            if ssim_weight:
                loss = loss + ssim_weight * (1 - ssim((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
        minutes = (time.perf_counter() - start) / 60
        history.append({"epoch": epoch + 1, "loss": total / len(images), "minutes": round(minutes, 2)})
        log(f"f{factor} epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f} ({minutes:.1f} min)")
        if max_minutes is not None and minutes > max_minutes and epoch + 1 < epochs:
            log(f"f{factor}: stopping after {epoch + 1} epochs, the {max_minutes} min budget is spent")
            stopped_early = True
            break
    ae.eval()
    record = {"seed": seed, "epochs": len(history), "epochs_requested": epochs, "batch_size": batch_size, "lr": lr,
              "crop": crop, "ssim_weight": ssim_weight, "n_train_images": int(len(images)),
              "train_minutes": round((time.perf_counter() - start) / 60, 2), "stopped_early": stopped_early,
              "torch_threads": torch.get_num_threads(), "history": history}
    return ae, record


# -- artifact -------------------------------------------------------------------------------------------------------
def training_data(data_dir: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """The card's ``training_data`` for :func:`load_images`' default sources (model cards v2, docs/model-cards.md)."""
    from medhe.models.modelcard import data_entry

    block: dict[str, Any] = {"parts": [data_entry(NIH, ["train"], data_dir=data_dir),
                                       data_entry(COVID, ["train"], data_dir=data_dir)]}
    if limit is not None:
        block["note"] = f"--limit {limit}: the first {limit} images of these parts, in this order; the hashes cover " \
                        "the whole parts"
    return block


def save_autoencoder(out_dir: str | Path, ae: VQAutoencoder, metrics: dict | None = None,
                     training: dict | None = None, data: dict | None = None) -> Path:
    """``autoencoder.safetensors`` (encoder, codebook, decoder) + ``autoencoder.json`` (config, metrics, command);
    with ``data`` (:func:`training_data`), the model card v2 fields too."""
    from medhe.atomic_folder import writing_folder
    from medhe.errors import ArtifactError

    out = Path(out_dir).expanduser()
    if out.is_dir():  # the folder is replaced as a whole (the old one intact until then): never lose other files
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS, CARD) and not p.name.endswith(".tmp"))
        if foreign:
            raise ArtifactError(f"{out} holds files that are not part of an autoencoder ({', '.join(foreign[:3])}): "
                                "move them away or choose another --out")
    tensors = {k: v.detach().clone().contiguous() for k, v in ae.state_dict().items()}
    weights = save(tensors)
    card = {"format": FORMAT, "config": ae.config, "encoder": {"arch": "vq-encoder", "arch_kwargs": ae.encoder_kwargs()},
            "latent_shape": [ae.latent_channels, IMAGE_SIZE // ae.factor, IMAGE_SIZE // ae.factor],
            "preprocessing": dict(PREPROCESS), "metrics": metrics or {}, "training": training or {}}
    if data is not None:
        from medhe.models.modelcard import complete_card

        card = complete_card(card, training_data=data)
    with writing_folder(out, "medhe train-autoencoder", replace=True) as tmp:
        atomic.write_bytes(tmp / WEIGHTS, weights)
        atomic.write_json(tmp / CARD, card)
    return out


def load_autoencoder(path: str | Path) -> tuple[VQAutoencoder, dict]:
    """Load a directory written by ``save_autoencoder`` (or the shipped ``vq-f8`` by name)."""
    from medhe.models.artifact import PRETRAINED_DIR

    path = Path(path).expanduser()
    if not path.is_dir() and (PRETRAINED_DIR / str(path)).is_dir():
        path = PRETRAINED_DIR / str(path)
    try:
        card = json.loads((path / CARD).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {CARD} is missing; train one with medhe train-autoencoder --out {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: {CARD} is not valid JSON ({exc}); retrain the autoencoder") from None
    if card.get("format") != FORMAT:
        raise ArtifactError(f"{path}: {CARD} format {card.get('format')!r} is not {FORMAT!r}; retrain the autoencoder")
    ae = VQAutoencoder(**card["config"])
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: {WEIGHTS} is missing or unreadable ({exc}); retrain the autoencoder") from None
    try:
        ae.load_state_dict(state)
    except RuntimeError:
        raise ArtifactError(f"{path}: {WEIGHTS} does not match the config in {CARD}; retrain the autoencoder") from None
    ae.eval()
    return ae, card


def command_line() -> str:
    """The command that is running, for the training record."""
    return " ".join(shlex.quote(a) for a in ["medhe", *sys.argv[1:]]) if sys.argv else "medhe"
