"""covid-cxr-ckks and the data discipline behind it: the autoencoder never sees COVID val/test images, the binary
latent classifier trains with cross-entropy, and the P1 table compares every row at one classifier width."""

import hashlib

import numpy as np
import pytest
import torch

from medhe.experiments import covid_latent as cl
from medhe.experiments import latent as lt
from medhe.models.metrics import compute_metrics


def _digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def test_autoencoder_training_images_exclude_covid_val_and_test(data_dir):
    """Test images must not be seen even unlabelled: only the NIH and COVID *train* splits train the encoder."""
    from medhe.data import load_dataset
    from medhe.models import train_autoencoder as ta

    images = ta.load_images(str(data_dir))
    covid = {s: load_dataset(cl.COVID, split=s, size=256, channels=1, data_dir=str(data_dir)).images
             for s in ("train", "val", "test")}
    nih_train = load_dataset(ta.NIH, split="train", size=256, channels=1, data_dir=str(data_dir)).images
    assert len(images) == len(nih_train) + len(covid["train"])
    seen = _digests(images)
    assert _digests(covid["train"]) <= seen
    assert not (_digests(covid["val"]) | _digests(covid["test"])) & seen


def test_binary_latent_classifier_trains_with_cross_entropy():
    """Two logits per image (softmax, like covid-cxr), selection on val AUC then ACC, shift augmentation in bounds."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (48, 1))
    x = rng.normal(size=(48, 4, 16, 16)).astype(np.float32)
    x[:, 0] += 1.5 * y[:, 0, None, None].astype(np.float32)  # an informative channel
    model, record = lt.train_classifier(x[:32], y[:32], x[32:], y[32:], arch_kwargs={"width": 4}, epochs=3,
                                        batch_size=16, flip=True, shift=2, task="binary-class")
    assert record["arch_kwargs"]["num_outputs"] == 2 and record["loss"] == "CrossEntropy"
    assert record["best_epoch"] in (1, 2, 3) and record["shift"] == 2 and 0 <= record["best_val_acc"] <= 1
    logits = lt._logits(model, x[32:])
    assert logits.shape == (16, 2)
    assert compute_metrics("binary-class", y[32:], logits)["auc"] == pytest.approx(record["best_val_auc"], abs=1e-4)
    shifted = lt._random_shift(torch.ones(3, 2, 8, 8), 2, np.random.default_rng(1))
    assert shifted.shape == (3, 2, 8, 8) and shifted.sum() >= 3 * 2 * 6 * 6


def test_p1_rows_share_one_classifier_width():
    """Every row of the P1 table (pixel 256 and f2 included) uses the default width, so rows compare inputs."""
    for shape in ((1, 256, 256), (2, 128, 128), (3, 64, 64), (4, 32, 32), (8, 16, 16), (1, 64, 64)):
        assert lt.row_arch_kwargs(shape) == lt.DEFAULT_ARCH_KWARGS


def test_covid_ckks_refuses_an_encoder_that_saw_the_test_split(tmp_path):
    """The shipped vq-f8 was trained on every COVID image: it must not become covid-cxr-ckks' client stage."""
    from medhe.errors import DataError

    with pytest.raises(DataError, match="val/test"):
        cl.train_covid_ckks("vq-f8", tmp_path)


@pytest.fixture(scope="module")
def shipped():
    from medhe.models.artifact import load_artifact

    return load_artifact("covid-cxr-ckks")


# v2 of the shipped covid-cxr-ckks (trained on covid19_radiography_large): tests/test_cxr_ckks.py checks its card


def test_shipped_covid_cxr_ckks_fits_one_ciphertext(shipped):
    """Compiles at the card's CKKS options with a single input ciphertext (no multi-ciphertext tensors needed)."""
    stats = lt.plan_stats(shipped, shipped.card["scheme_options"]["ckks"])
    assert stats["plan"]["input_ciphertexts"] == 1 and stats["plan"]["poly_degree"] == 32768


def test_output_bound_from_train_and_val_logits():
    """2 x the largest |logit| seen, rounded up to a power of two; a bound the caller gave is kept."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].bias.zero_()
    x = np.full((3, 1, 2, 2), 2.5, dtype=np.float32)  # logits 10
    assert lt.logit_bound(model, (x, x[:1])) == 32.0
    assert lt.with_output_bound({"scale_bits": 36}, model, (x,)) == {"scale_bits": 36, "output_bound": 32.0}
    assert lt.with_output_bound({"output_bound": 7.0}, model, (x,)) == {"output_bound": 7.0}
    assert lt.with_output_bound(None, model, (x,)) is None
