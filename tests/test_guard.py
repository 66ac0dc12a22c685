"""The input guard (``medhe.data.guard``): quiet on real scans, one clear warning for each kind of misfit."""

import numpy as np
import pytest

from medhe.data import Preprocess, load_dataset
from medhe.data.guard import check_image, image_stats


@pytest.fixture(scope="module")
def val(data_dir):
    return load_dataset("pneumoniamnist", split="val", size=28, data_dir=data_dir).images


PRE = Preprocess(channels=1, size=28)


def test_real_radiographs_are_not_flagged(val):
    flagged = [i for i, img in enumerate(val) if check_image(img, PRE)]
    assert len(flagged) <= len(val) // 100, flagged  # at most 1 % of the validation set


def test_each_misfit_gets_its_own_sentence(val):
    rng = np.random.default_rng(0)
    scan = val[0]
    cases = {
        "smaller than the model's 28x28": scan[:16, :16],
        "will be squeezed": np.tile(scan, (1, 2)),
        "in colour": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "almost uniform": np.full((64, 64), 200, dtype=np.uint8),
        "pure black or white": (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8),
    }
    for phrase, image in cases.items():
        warnings = check_image(image, PRE)
        assert any(phrase in w for w in warnings), (phrase, warnings)
        assert all("\n" not in w for w in warnings)
    grey_rgb = np.repeat(scan[..., None], 3, axis=-1)  # a grey scan saved as RGB is still a grey scan
    assert check_image(grey_rgb, PRE) == []


def test_stats_describe_the_image_as_the_model_sees_it(val):
    stats = image_stats(np.tile(val[0], (4, 4)), Preprocess(channels=1, size=28, crop="center"))
    assert (stats.width, stats.height, stats.channels) == (112, 112, 1)
    assert 0 < stats.mean < 1 and 0 < stats.std < 0.5 and set(stats.to_dict()) >= {"mean", "std", "saturated"}
