"""P1's latent-space pipeline: a small VQ autoencoder the client runs, and the HE-friendly CNN the server runs on its latent.

Compressing a 256x256 chest X-ray by a factor f per side before encryption shrinks what CKKS has to carry and
compute on by f^2 / latent_channels. P1 used a VQGAN; here the same shape of model (conv encoder, vector-quantised
codebook, conv decoder) is kept small enough to train on a 2-core CPU. The classifier reads the *continuous*
encoder output (before quantisation), as in P1: the codebook only exists to make the latent a good compressor.

The encoder is client-side plaintext code, so it may use any layer; the latent classifier is server-side and must
stay inside the HE-friendly layer set (``medhe.models.layers.check_he_friendly``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medhe.models.layers import HESqueezeExcite, PolyAct

#: P1's latent channel count per downsampling factor (f2: 128x128x2, f4: 64x64x3, f8: 32x32x4, f16: 16x16x8).
LATENT_CHANNELS = {2: 2, 4: 3, 8: 4, 16: 8}
FACTORS = tuple(LATENT_CHANNELS)

#: feature width at each resolution step (step 0 = input resolution); small so a factor trains in minutes on a CPU.
DEFAULT_WIDTHS = (16, 32, 48, 64, 64)


def _check_factor(factor: int) -> int:
    if factor not in LATENT_CHANNELS:
        raise ValueError(f"downsampling factor {factor!r} is not supported: use one of {', '.join(map(str, FACTORS))}")
    return int(factor)


def _widths(factor: int, widths) -> list[int]:
    steps = int(math.log2(factor))
    widths = list(widths or DEFAULT_WIDTHS)
    if len(widths) < steps + 1:
        widths += [widths[-1]] * (steps + 1 - len(widths))
    return widths[: steps + 1]


class Encoder(nn.Sequential):
    """Image (N, C, H, W) -> continuous latent (N, latent_channels, H/f, W/f).

    Strided 3x3 convs halve the resolution log2(f) times, one 3x3 conv mixes at the latent resolution, and a 1x1 conv
    projects to the latent channels. No normalisation layer depends on the batch, so one image encodes the same
    alone or in a batch (the client encodes single scans).
    """

    def __init__(self, factor: int = 8, latent_channels: int | None = None, in_channels: int = 1,
                 widths: tuple[int, ...] | list[int] | None = None) -> None:
        factor = _check_factor(factor)
        latent_channels = int(latent_channels or LATENT_CHANNELS[factor])
        w = _widths(factor, widths)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, w[0], 3, padding=1), nn.SiLU()]
        for i in range(len(w) - 1):
            layers += [nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(w[-1], w[-1], 3, padding=1), nn.SiLU(), nn.Conv2d(w[-1], latent_channels, 1)]
        super().__init__(*layers)
        self.factor = factor
        self.latent_channels = latent_channels


class Decoder(nn.Sequential):
    """Latent (N, latent_channels, H/f, W/f) -> image (N, C, H, W): the encoder mirrored with transposed convs."""

    def __init__(self, factor: int = 8, latent_channels: int | None = None, out_channels: int = 1,
                 widths: tuple[int, ...] | list[int] | None = None) -> None:
        factor = _check_factor(factor)
        latent_channels = int(latent_channels or LATENT_CHANNELS[factor])
        w = _widths(factor, widths)
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, w[-1], 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(w[-1], w[-1], 3, padding=1), nn.SiLU()]
        for i in range(len(w) - 1, 0, -1):
            layers += [nn.ConvTranspose2d(w[i], w[i - 1], 4, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(w[0], out_channels, 3, padding=1)]
        super().__init__(*layers)


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantisation with the straight-through gradient and the commitment loss (VQ-VAE).

    Codewords follow the encoder by exponential moving averages (VQ-VAE-2) rather than by gradient: the encoder's
    output scale moves faster than Adam can move a codeword, which made the plain codebook loss diverge here.
    Codes left unused are restarted on random encoder outputs, and the codebook starts from encoder outputs of the
    first batch (random codes leave most of them dead on a dataset this small).
    """

    def __init__(self, num_codes: int = 256, dim: int = 4, beta: float = 0.25, decay: float = 0.99) -> None:
        super().__init__()
        self.num_codes = int(num_codes)
        self.dim = int(dim)
        self.beta = float(beta)
        self.decay = float(decay)
        self.register_buffer("codebook", torch.zeros(self.num_codes, self.dim))
        self.register_buffer("ema_count", torch.ones(self.num_codes))
        self.register_buffer("ema_sum", torch.zeros(self.num_codes, self.dim))
        self.register_buffer("initialized", torch.tensor(False))

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, self.dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code index per latent position, (N, H, W)."""
        flat = self._flat(z)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                + self.codebook.pow(2).sum(1)[None, :])
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        if not bool(self.initialized):
            pick = torch.randint(0, flat.shape[0], (self.num_codes,))
            self.codebook.copy_(flat[pick])
            self.ema_sum.copy_(flat[pick])
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
            return
        counts = torch.bincount(idx, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count[:, None])
        dead = self.ema_count < 1e-2
        if bool(dead.any()):
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),))
            self.codebook[dead] = flat[pick]
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 1.0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (quantised latent with straight-through gradient, commitment loss, code indices)."""
        if self.training:
            flat = self._flat(z.detach())
            if not bool(self.initialized):
                self._update(flat, torch.zeros(0, dtype=torch.long))
            idx = self.indices(z)
            self._update(flat, idx.reshape(-1))
        else:
            idx = self.indices(z)
        zq = self.codebook[idx].permute(0, 3, 1, 2)
        loss = self.beta * F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), loss, idx


class VQAutoencoder(nn.Module):
    """Encoder + codebook + decoder; ``encode`` gives the continuous latent the classifier reads."""

    def __init__(self, factor: int = 8, latent_channels: int | None = None, in_channels: int = 1,
                 widths: tuple[int, ...] | list[int] | None = None, num_codes: int = 256, beta: float = 0.25) -> None:
        super().__init__()
        factor = _check_factor(factor)
        latent_channels = int(latent_channels or LATENT_CHANNELS[factor])
        self.factor = factor
        self.latent_channels = latent_channels
        self.config = {"factor": factor, "latent_channels": latent_channels, "in_channels": in_channels,
                       "widths": list(_widths(factor, widths)), "num_codes": int(num_codes), "beta": float(beta)}
        self.encoder = Encoder(factor, latent_channels, in_channels, widths)
        self.quantizer = VectorQuantizer(num_codes, latent_channels, beta)
        self.decoder = Decoder(factor, latent_channels, in_channels, widths)

    def encoder_kwargs(self) -> dict:
        """``arch_kwargs`` that rebuild exactly this encoder through the zoo (arch ``vq-encoder``)."""
        c = self.config
        return {"factor": c["factor"], "latent_channels": c["latent_channels"], "in_channels": c["in_channels"],
                "widths": c["widths"]}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction through the codebook, and the VQ loss."""
        z = self.encoder(x)
        zq, vq_loss, _ = self.quantizer(z)
        return self.decoder(zq), vq_loss

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        zq, _, _ = self.quantizer(z)
        return self.decoder(zq)


def build_encoder(factor: int = 8, latent_channels: int | None = None, in_channels: int = 1,
                  widths: tuple[int, ...] | list[int] | None = None, **_ignored) -> Encoder:
    """Zoo entry ``vq-encoder``: the client stage of latent models (weights come from ``client.safetensors``).

    Extra keyword arguments (``num_outputs``, ``image_size`` from generic callers) are ignored: the encoder's shape
    is fixed by the factor.
    """
    return Encoder(factor, latent_channels, in_channels, widths)


def build_latent_classifier(in_channels: int = 4, num_outputs: int = 14, image_size: int = 32, width: int = 16,
                            groups: int = 1, se_reduction: int = 4, head_size: int = 4,
                            use_se: bool = True, act_init: str = "relu", blocks: int = 2) -> nn.Sequential:
    """Zoo entry ``latent-hecnn``: a CKKS-cheap CNN for a latent (or a small image), HE-friendly layers only.

    conv -> BN -> quadratic -> avgpool (x ``blocks``; widths w, 2w, 2w, ...), squeeze-and-excitation with the cubic
    sigmoid gate (P1), average pool down to ``head_size`` x ``head_size``, linear head. Few convs and early pooling
    keep the multiplicative depth and the number of rotations low; the same builder serves every factor (and
    pixel-space baselines) so their costs compare like for like. A third block (``blocks=3``) adds two levels of
    depth for a deeper receptive field on the 32x32 latent.
    """
    down = 2 ** blocks
    if blocks < 1 or image_size % down or image_size // down < head_size or (image_size // down) % head_size:
        raise ValueError(f"image_size {image_size} must be a multiple of {down}*head_size ({down * head_size}) "
                         f"for {blocks} blocks")
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(blocks):
        c_out = width if i == 0 else 2 * width
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, groups=1 if i == 0 else groups), nn.BatchNorm2d(c_out),
                   PolyAct(act_init), nn.AvgPool2d(2)]
        c_in = c_out
    if use_se:
        layers.append(HESqueezeExcite(c_in, reduction=se_reduction))
    rest = image_size // down // head_size
    if rest > 1:
        layers.append(nn.AvgPool2d(rest))
    layers += [nn.Flatten(), nn.Linear(c_in * head_size * head_size, num_outputs)]
    return nn.Sequential(*layers)
