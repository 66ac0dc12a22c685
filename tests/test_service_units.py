"""Fast pieces of the service that need no server: model specs, result interpretation, output lines, sizes."""

import numpy as np
import pytest

from medhe.cli.predict import format_result
from medhe.cli.serve import _size
from medhe.errors import ArtifactError, MedheError
from medhe.service import protocol
from medhe.service.catalog import load_catalog, parse_model_arg
from medhe.service.client import interpret


def test_model_arg_parsing():
    assert parse_model_arg("pneumoniamnist") == ("pneumoniamnist", None)
    assert parse_model_arg("pneumoniamnist:CKKS") == ("pneumoniamnist", "ckks")
    assert parse_model_arg("/models/x:paillier") == ("/models/x", "paillier")
    with pytest.raises(ArtifactError, match="unknown scheme 'bfv'"):
        parse_model_arg("pneumoniamnist:bfv")
    with pytest.raises(ArtifactError, match="no model to serve"):
        load_catalog([])


def test_catalog_ids_are_unique_per_scheme():
    one = load_catalog(["pneumoniamnist"])
    assert [m.id for m in one] == ["pneumoniamnist"] and one[0].ref.scheme == "ckks"
    assert one[0].describe()["endpoints"]["infer"] == "/v1/models/pneumoniamnist/infer"
    both = load_catalog(["pneumoniamnist:ckks", "pneumoniamnist:tfhe"])
    assert [m.id for m in both] == ["pneumoniamnist-ckks", "pneumoniamnist-tfhe"]
    with pytest.raises(ArtifactError, match="twice"):
        load_catalog(["pneumoniamnist", "pneumoniamnist:ckks"])


def test_catalog_names_batch_routes_only_where_batch_mode_serves():
    ckks, tfhe = load_catalog(["pneumoniamnist:ckks", "pneumoniamnist:tfhe"])
    ends = ckks.describe()["endpoints"]
    assert ckks.batch_capable and ends["batch"] == protocol.batch_path("pneumoniamnist-ckks")
    assert ends["batch_keys"] == protocol.batch_keys_path("pneumoniamnist-ckks")
    assert ends["batch_infer"] == protocol.batch_infer_path("pneumoniamnist-ckks")
    assert not tfhe.batch_capable and "batch" not in tfhe.describe()["endpoints"]
    (staged,) = load_catalog(["covid-cxr:ckks"])  # a public client stage runs first: no batch mode
    assert staged.client_weights is not None and "batch" not in staged.describe()["endpoints"]


def test_interpret_and_format():
    d = interpret("binary-class", ["normal", "pneumonia"], np.array([-2.0, 3.0]), "m", "a.png")
    assert d.label == "pneumonia" and d.probabilities["pneumonia"] == pytest.approx(1 / (1 + np.exp(-5)))
    assert format_result(d) == "a.png: pneumonia (p=0.993)"
    ml = interpret("multi-label", ["a", "b", "c"], np.array([2.0, -1.0, 0.5]), "m", "x.dcm")
    assert ml.positive == ["a", "c"] and format_result(ml) == "x.dcm: a 0.881, c 0.622"
    assert format_result(interpret("multi-label", ["a"], np.array([-3.0]), "m", "y")) == "y: no finding"
    with pytest.raises(MedheError, match="3 outputs for 2 labels"):
        interpret("multi-class", ["a", "b"], np.zeros(3), "m")


def test_size_arguments():
    assert _size("64M") == 64 << 20 and _size("2GiB") == 2 << 30 and _size("1000") == 1000
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        _size("lots")
