"""The TenSEAL Tutorial-4 pipeline, kept faithful to the tutorial, as the yardstick for medhe's CKKS engine.

TenSEAL's "Encrypted Convolution on MNIST" tutorial is the best-known public baseline for encrypted CNN inference
on 28x28 images: im2col-encoded input, one conv (1->4, k7, s3), x², FC 256->64, x², FC 64->10, N=8192,
coefficient chain [31, 26 x 6, 31] at scale 2^26, all Galois keys. We reproduce it call for call (same TenSEAL
API, same parameters) so that "x times faster than TenSEAL" is measured on identical work, on the same machine, in
the same run. TenSEAL is a benchmark-only dependency: nothing else in medhe imports this module.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medhe.errors import PlanError

#: The tutorial's parameters, verbatim.
POLY_MODULUS_DEGREE = 8192
BITS_SCALE = 26
COEFF_MOD_BIT_SIZES = [31, BITS_SCALE, BITS_SCALE, BITS_SCALE, BITS_SCALE, BITS_SCALE, BITS_SCALE, 31]
KERNEL, STRIDE = 7, 3


def _tenseal():
    try:
        import tenseal as ts
    except ImportError:
        raise PlanError("the TenSEAL reference needs the benchmark extra: pip install tenseal==0.3.18") from None
    return ts


def tutorial4_model(num_outputs: int = 10, seed: int = 0) -> nn.Sequential:
    """The tutorial's ConvNet as a medhe model (arch ``tenseal-tutorial4``), deterministically initialised."""
    from medhe.models.zoo import build_model

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        return build_model("tenseal-tutorial4", in_channels=1, num_outputs=num_outputs, image_size=28).eval()


def _layers(model: nn.Sequential) -> tuple[nn.Conv2d, nn.Linear, nn.Linear]:
    """The conv and the two FC layers; refuses anything that is not exactly the tutorial's shape."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ok = (len(convs) == 1 and len(fcs) == 2 and convs[0].in_channels == 1 and convs[0].kernel_size == (KERNEL, KERNEL)
          and convs[0].stride == (STRIDE, STRIDE) and convs[0].padding == (0, 0) and convs[0].bias is not None
          and fcs[0].in_features == convs[0].out_channels * 64)
    if not ok:
        raise PlanError("the TenSEAL Tutorial-4 reference runs only the tutorial's network "
                        "(Conv 1->C k7 s3, x², FC, x², FC on 28x28): build it with arch 'tenseal-tutorial4'")
    return convs[0], fcs[0], fcs[1]


@dataclass
class TenSEALTutorial4:
    """Tutorial 4's ``EncConvNet`` plus its context, for one torch model's weights.

    The tutorial keeps one private context for both sides; we do the same for timing, and report the sizes that a
    client/server split would send (input ciphertext, output ciphertext, public context with Galois + relin keys).
    """

    model: nn.Sequential
    n_threads: int | None = None
    context: Any = field(init=False, repr=False)
    keygen_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        ts = _tenseal()
        conv, fc1, fc2 = _layers(self.model)
        self.conv_weight = conv.weight.data.view(conv.out_channels, KERNEL, KERNEL).tolist()
        self.conv_bias = conv.bias.data.tolist()
        self.fc1_weight = fc1.weight.T.data.tolist()
        self.fc1_bias = fc1.bias.data.tolist()
        self.fc2_weight = fc2.weight.T.data.tolist()
        self.fc2_bias = fc2.bias.data.tolist()
        t0 = time.perf_counter()
        kwargs = {} if self.n_threads is None else {"n_threads": int(self.n_threads)}
        self.context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE,
                                  coeff_mod_bit_sizes=COEFF_MOD_BIT_SIZES, **kwargs)
        self.context.global_scale = 2 ** BITS_SCALE
        self.context.generate_galois_keys()
        self.keygen_s = time.perf_counter() - t0

    # -- the three stages, timed separately by the caller --------------------------------------------------------
    def encrypt(self, image: np.ndarray) -> tuple[Any, int]:
        """Client: one normalised (28, 28) image -> (im2col-encoded CKKSVector, windows_nb)."""
        image = np.asarray(image, dtype=np.float64).reshape(28, 28)
        return _tenseal().im2col_encoding(self.context, image.tolist(), KERNEL, KERNEL, STRIDE)

    def forward(self, enc_x: Any, windows_nb: int) -> Any:
        """Server: the tutorial's ``EncConvNet.forward``, line for line."""
        ts = _tenseal()
        enc_channels = []
        for kernel, bias in zip(self.conv_weight, self.conv_bias):
            y = enc_x.conv2d_im2col(kernel, windows_nb) + bias
            enc_channels.append(y)
        enc_x = ts.CKKSVector.pack_vectors(enc_channels)
        enc_x.square_()
        enc_x = enc_x.mm(self.fc1_weight) + self.fc1_bias
        enc_x.square_()
        enc_x = enc_x.mm(self.fc2_weight) + self.fc2_bias
        return enc_x

    def load(self, data: bytes) -> Any:
        """A serialized CKKSVector back into this context (what a TenSEAL server does with a request)."""
        return _tenseal().ckks_vector_from(self.context, data)

    def decrypt(self, enc_out: Any) -> np.ndarray:
        return np.asarray(enc_out.decrypt(), dtype=np.float64)

    # -- sizes a client/server split would send ------------------------------------------------------------------
    def key_bytes(self) -> int:
        """Public context as the tutorial would ship it: Galois + relin keys (+ public key), no secret key."""
        return len(self.context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                          save_relin_keys=True))

    def one(self, image: np.ndarray) -> tuple[tuple[float, float, float], np.ndarray, int, int]:
        """One image, bytes in and bytes out like a server (and like medhe's ``server.infer``): the client encrypts
        and serializes, the server deserializes, evaluates and serializes, the client deserializes and decrypts.
        Returns (encrypt, eval, decrypt) seconds, logits, input bytes, output bytes."""
        t0 = time.perf_counter()
        enc_x, windows_nb = self.encrypt(image)
        sent = enc_x.serialize()
        t1 = time.perf_counter()
        answer = self.forward(self.load(sent), windows_nb).serialize()
        t2 = time.perf_counter()
        logits = self.decrypt(self.load(answer))
        t3 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2), logits, len(sent), len(answer)

    def run(self, images: np.ndarray) -> dict[str, Any]:
        """Encrypt, evaluate and decrypt each image; per-stage seconds, logits and sizes."""
        stages, logits = [], []
        in_bytes = out_bytes = 0
        for image in images:
            times, out, in_bytes, out_bytes = self.one(image)
            stages.append(times)
            logits.append(out)
        enc_s, eval_s, dec_s = (list(col) for col in zip(*stages))
        return {"encrypt_s": enc_s, "eval_s": eval_s, "decrypt_s": dec_s, "logits": np.stack(logits),
                "input_bytes": in_bytes, "output_bytes": out_bytes, "key_bytes": self.key_bytes(),
                "keygen_s": self.keygen_s, "n_threads": self.n_threads or os.cpu_count()}


def plaintext_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The torch model's logits for (N, 28, 28) normalised images (the ground truth for error reports)."""
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 28, 28)
        return model.eval()(x).double().numpy()
