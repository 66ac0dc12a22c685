"""Metrics follow MedMNIST's conventions and agree with scikit-learn computed directly."""

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medhe.errors import DataError
from medhe.models.metrics import compute_metrics, predictions, probabilities

RNG = np.random.default_rng(7)


def test_binary_uses_probability_of_class_one_and_argmax():
    y = RNG.integers(0, 2, size=(200, 1))
    z = RNG.normal(size=(200, 2)) + y * np.array([[0.0, 1.0]])
    m = compute_metrics("binary-class", y, z)
    p = softmax(z, axis=1)
    assert m["auc"] == pytest.approx(roc_auc_score(y[:, 0], p[:, 1]))
    assert m["acc"] == pytest.approx(accuracy_score(y[:, 0], z.argmax(1)))
    assert m["f1"] == pytest.approx(f1_score(y[:, 0], z.argmax(1)))


@pytest.mark.parametrize("task", ["multi-class", "ordinal-regression"])
def test_multi_class_and_ordinal_use_one_vs_rest_macro_auc(task):
    y = RNG.integers(0, 5, size=(300, 1))
    z = RNG.normal(size=(300, 5))
    z[np.arange(300), y[:, 0]] += 1.0
    m = compute_metrics(task, y, z)
    p = softmax(z, axis=1)
    assert m["auc"] == pytest.approx(roc_auc_score(y[:, 0], p, multi_class="ovr", average="macro"))
    assert m["acc"] == pytest.approx(accuracy_score(y[:, 0], z.argmax(1)))
    assert m["f1"] == pytest.approx(f1_score(y[:, 0], z.argmax(1), average="macro"))


def test_multi_label_macro_auc_skips_labels_with_one_class_and_acc_is_per_label():
    y = RNG.integers(0, 2, size=(120, 6))
    y[:, 5] = 0  # never positive: AUC undefined for this label
    z = RNG.normal(size=(120, 6)) + y
    m = compute_metrics("multi-label", y, z)
    p = expit(z)
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(5)]))
    assert m["acc"] == pytest.approx(np.mean((p > 0.5) == y))
    assert m["f1"] == pytest.approx(f1_score(y, (p > 0.5).astype(int), average="macro", zero_division=0))


def test_predictions_and_probabilities_per_task():
    z = np.array([[2.0, -1.0], [-0.5, 0.5]])
    assert predictions("binary-class", z).tolist() == [0, 1]
    assert np.allclose(probabilities("binary-class", z).sum(1), 1)
    assert predictions("multi-label", z).tolist() == [[1, 0], [0, 1]]
    assert np.allclose(probabilities("multi-label", z), expit(z))


def test_undefined_auc_is_none_and_bad_input_raises_a_one_line_data_error():
    assert compute_metrics("binary-class", np.zeros((4, 1)), RNG.normal(size=(4, 2)))["auc"] is None
    with pytest.raises(DataError, match="3 labels but 4 predictions"):
        compute_metrics("binary-class", np.zeros((3, 1)), np.zeros((4, 2)))
    with pytest.raises(DataError, match="unknown task"):
        compute_metrics("segmentation", np.zeros((3, 1)), np.zeros((3, 2)))
