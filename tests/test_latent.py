"""Latent classifiers: HE-friendliness, multi-label metrics against scikit-learn, training/export, encrypted SE."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from medhe.experiments import latent as lt
from medhe.models.autoencoder import LATENT_CHANNELS, VQAutoencoder, build_latent_classifier
from medhe.models.layers import HESqueezeExcite, check_he_friendly
from medhe.models.metrics import compute_metrics


@pytest.fixture(scope="module")
def nih(data_dir):
    return lt.load_splits(str(data_dir))


@pytest.mark.parametrize("factor", sorted(LATENT_CHANNELS))
def test_latent_classifier_is_he_friendly_for_every_factor(factor):
    side = 256 // factor
    model = build_latent_classifier(LATENT_CHANNELS[factor], 14, side).eval()
    check_he_friendly(model)
    assert any(isinstance(m, HESqueezeExcite) for m in model.modules())
    assert model(torch.randn(3, LATENT_CHANNELS[factor], side, side)).shape == (3, 14)


def test_pixel_baselines_build():
    for size in (64, 256):
        model = build_latent_classifier(1, 14, size).eval()
        check_he_friendly(model)
        assert model(torch.randn(1, 1, size, size)).shape == (1, 14)
    with pytest.raises(ValueError, match="multiple"):
        build_latent_classifier(4, 14, 30)


def test_multilabel_metrics_match_scikit_learn(nih):
    """Macro AUC over labels with both classes, macro F1 at sigmoid 0.5, and the bootstrap around them."""
    y = nih["test"].labels
    rng = np.random.default_rng(0)
    logits = rng.normal(size=y.shape) + 1.5 * y  # informative, imperfect scores
    m = compute_metrics("multi-label", y, logits)
    both = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, k], logits[:, k]) for k in both]))
    if len(both) == y.shape[1]:
        assert m["auc"] == pytest.approx(roc_auc_score(y, logits, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, (logits > 0).astype(int), average="macro", zero_division=0))
    boot = lt.bootstrap_macro_auc(y, logits, n_boot=200, seed=0)
    assert boot["auc"] == pytest.approx(m["auc"]) and boot["ci_low"] < m["auc"] < boot["ci_high"]
    assert boot == lt.bootstrap_macro_auc(y, logits, n_boot=200, seed=0)
    # the vectorised rank AUC used by the bootstrap equals scikit-learn's, ties included
    ties = np.round(logits)
    for k in both:
        assert lt._rank_auc(y, ties)[k] == pytest.approx(roc_auc_score(y[:, k], ties[:, k]))


def test_train_export_and_reload_latent_model(tmp_path, nih):
    """The exported model's client stage (encoder) reproduces the latents it was trained on."""
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs

    torch.manual_seed(0)
    ae = VQAutoencoder(16).eval()
    tr, va = nih["train"], nih["val"]
    x_tr, x_va = lt.encode_images(ae.encoder, tr.images[:32]), lt.encode_images(ae.encoder, va.images[:16])
    assert x_tr.shape == (32, 8, 16, 16)
    model, record = lt.train_classifier(x_tr, tr.labels[:32], x_va, va.labels[:16], epochs=2, batch_size=16)
    assert record["best_epoch"] in (1, 2) and record["arch_kwargs"]["image_size"] == 16
    metrics = {"val": compute_metrics("multi-label", va.labels[:16], lt._logits(model, x_va))}
    out = lt.export_latent_model(tmp_path / "m", ae, model, record, metrics, tr.label_names, name="tiny")
    art = load_artifact(out)
    assert art.card["client_stage"]["arch"] == "vq-encoder"
    assert art.card["scheme_options"]["default_scheme"] == "ckks"
    assert all(v is not None for v in art.card["activation_ranges"].values())
    x = model_inputs(art, va.images[:4])
    np.testing.assert_allclose(x, x_va[:4], atol=1e-5)
    np.testing.assert_allclose(lt._logits(art.model, x), lt._logits(model, x_va[:4]), atol=1e-5)


def test_table_and_plot_are_written(tmp_path):
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    z = np.array([[2.0, -1], [-1, 2], [1, 1], [-2, -2]])
    row = {"row": "f8", "factor": 8, "width": 8, "input_shape": [4, 32, 32], "psnr": 30.0, "ssim": 0.8,
           "plain": {"auc": 1.0, "auc_bootstrap": lt.bootstrap_macro_auc(y, z, n_boot=20)},
           "encrypted": {"error": "PlanError: does not fit"}}
    few = {**row, "row": "f4", "encrypted": {"n": 3, "agreement": 1.0, "agreeing_decisions": 6, "decisions": 6,
                                            "metrics": {"auc": 0.9}, "server_latency_s": {"median": 2.0}}}
    result = {"n_test": 4, "arch_kwargs": {}, "rows": [row, few], "enc_limit": 3}
    lt._ratios(result)
    paths = lt.write_table(result, tmp_path)
    text = paths["md"].read_text()
    assert "| f8 | 4x32x32 | 8 | 30.00 |" in text and "does not fit" in text
    # an AUC over 3 images is not reported as one; the agreement is, with its counts
    assert "n=3, too few for AUC" in text and "0.900" not in text and "1.0000 (6/6)" in text
    from PIL import Image
    assert Image.open(paths["png"]).size[0] > 0


@pytest.mark.slow
def test_tiny_encrypted_se_model_on_a_latent(nih):
    """A trained tiny latent classifier with squeeze-and-excitation, under CKKS, agrees with plaintext.

    The f16 encoder on 128x128 crops gives an 8x8x8 latent: the smallest real latent, so the test stays cheap.
    """
    pytest.importorskip("medhe.he.ckks.server", reason="the CKKS engine has not landed in this checkout")
    from medhe.models.artifact import load_artifact
    from medhe.models.train_autoencoder import to_tensor

    torch.manual_seed(0)
    ae = VQAutoencoder(16).eval()
    tr, va = nih["train"], nih["val"]
    with torch.no_grad():
        x_tr = ae.encoder(to_tensor(tr.images[:32, 64:192, 64:192])).numpy()
        x_va = ae.encoder(to_tensor(va.images[:8, 64:192, 64:192])).numpy()
    assert x_tr.shape == (32, 8, 8, 8)
    model, record = lt.train_classifier(x_tr, tr.labels[:32], x_va, va.labels[:8], epochs=2, batch_size=16,
                                        arch_kwargs={"width": 4, "se_reduction": 2, "head_size": 2})
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        art = load_artifact(lt.export_latent_model(tmp, ae, model, record, {}, tr.label_names, name="tiny-se",
                                                         image_size=128, ckks_options={}))
        checkpoints: list[dict] = []
        result = lt.encrypted_eval(art, x_va[:2], va.labels[:2], checkpoint=checkpoints.append)
    assert [c["n"] for c in checkpoints] == [1, 2]  # a summary after every image, keys already counted
    assert checkpoints[0]["evaluation_key_bytes"] == result["evaluation_key_bytes"] > 0
    plain = lt._logits(art.model, x_va[:2])
    assert result["max_abs_logit_error"] < 1e-2
    assert np.array_equal(np.asarray(result["logits"]) > 0, plain > 0) and result["agreement"] == 1.0
    assert result["server_cpu_s_median"] > 0 and result["input_ciphertext_bytes"] > 0


def test_shipped_cxr14_latent(nih):
    """The default model: HE-friendly server network on the 4x32x32 latent of the shipped f8 encoder, CKKS by
    default, and its recorded test macro AUC is what the shipped weights give on the test split."""
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs

    art = load_artifact("cxr14-latent")
    check_he_friendly(art.model)
    assert any(isinstance(m, HESqueezeExcite) for m in art.model.modules())
    assert art.card["scheme_options"]["default_scheme"] == "ckks" and art.task == "multi-label"
    assert art.card["client_stage"]["arch"] == "vq-encoder" and art.card["client_stage"]["arch_kwargs"]["factor"] == 8
    test = nih["test"]
    x = model_inputs(art, test.images)
    assert x.shape == (len(test), 4, 32, 32)
    auc = compute_metrics("multi-label", test.labels, lt._logits(art.model, x))["auc"]
    assert auc == pytest.approx(art.card["metrics"]["test"]["auc"], abs=1e-6)
    boot = art.card["metrics"]["test"]["auc_bootstrap"]
    assert boot["ci_low"] <= auc <= boot["ci_high"]

