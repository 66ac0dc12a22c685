"""medhe.data on the real shared files (MEDHE_DATA) plus small synthetic folders/images built in tmp_path."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.data import Dataset, Preprocess, dataset_info, load_dataset, read_image, resolve_data_dir
from medhe.data import medmnist
from medhe.errors import DataError

DATA = Path(os.environ.get("MEDHE_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
COVID = DATA / "covid19_radiography_subset"
NIH = DATA / "nih_chestxray14_subset"

README_MD5 = {
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
}
SPLIT_SIZES = {
    "pneumoniamnist": (4708, 524, 624),
    "breastmnist": (546, 78, 156),
    "retinamnist": (1080, 120, 400),
}


def need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} missing: set MEDHE_DATA to the shared data folder")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("MEDHE_OFFLINE", "1")
    monkeypatch.setenv("MEDHE_DATA", str(DATA))


# -- MedMNIST ------------------------------------------------------------------------------------------------------
def test_table_has_all_2d_flags_and_readme_md5s():
    assert set(medmnist.FLAGS) == {
        "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
        "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
    }
    for flag, md5 in README_MD5.items():
        assert medmnist.MEDMNIST[flag].md5_for(28) == md5
    info = medmnist.MEDMNIST["pneumoniamnist"]
    assert info.filename(28) == "pneumoniamnist.npz" and info.filename(64) == "pneumoniamnist_64.npz"
    assert info.url(128) == "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1"
    for info in medmnist.MEDMNIST.values():
        assert info.task in ("binary-class", "multi-class", "multi-label", "ordinal-regression")
        assert len(info.label_names) >= 2 and info.n_channels in (1, 3)
        assert all(m is None or len(m) == 32 for m in info.md5)


@pytest.mark.parametrize("flag", sorted(SPLIT_SIZES))
def test_real_medmnist_splits(flag):
    need(DATA / f"{flag}.npz")
    info = dataset_info(flag)
    for split, n in zip(("train", "val", "test"), SPLIT_SIZES[flag]):
        ds = load_dataset(flag, split=split, size=28)
        assert isinstance(ds, Dataset) and len(ds) == n and ds.split == split
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64 and ds.labels.shape == (n, 1)
        assert ds.images.shape[1:3] == (28, 28) and ds.n_channels == info["n_channels"]
        assert 0 <= ds.labels.min() and ds.labels.max() < len(ds.label_names)
    assert len(load_dataset(flag, split="all")) == sum(SPLIT_SIZES[flag])


def test_real_label_counts_and_channels():
    need(DATA / "pneumoniamnist.npz")
    test = load_dataset("pneumoniamnist", split="test")
    assert np.bincount(test.labels[:, 0]).tolist() == [234, 390]
    assert test.task == "binary-class" and test.label_names == ["normal", "pneumonia"]
    assert np.bincount(load_dataset("breastmnist", split="test").labels[:, 0]).tolist() == [42, 114]
    retina = load_dataset("retinamnist", split="val")
    assert retina.images.shape == (120, 28, 28, 3) and retina.task == "ordinal-regression"
    assert load_dataset("retinamnist", split="val", channels=1).images.shape == (120, 28, 28)
    assert load_dataset("breastmnist", split="val", channels=3).images.shape == (78, 28, 28, 3)


def test_md5_is_cached_per_path_mtime_size(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert medmnist.file_md5(f) == "900150983cd24fb0d6963f7d28e17f72"
    st = f.stat()
    assert (str(f.resolve()), st.st_mtime_ns, st.st_size) in medmnist._md5_cache
    f.write_bytes(b"abcd")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert medmnist.file_md5(f) == "e2fc714c4727ee9395f324cd2e7f331f"


def test_corrupted_copy_is_rejected(tmp_path):
    need(DATA / "breastmnist.npz")
    raw = bytearray((DATA / "breastmnist.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "breastmnist.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupted") as err:
        load_dataset("breastmnist", data_dir=tmp_path)
    assert "\n" not in str(err.value) and "delete it" in str(err.value)


def test_unreadable_npz_without_known_md5(tmp_path, monkeypatch, caplog):
    info = medmnist.MEDMNIST["breastmnist"]
    monkeypatch.setitem(medmnist.MEDMNIST, "breastmnist", replace(info, md5=(None,) * 4))
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="medhe.data.medmnist"):
        with pytest.raises(DataError, match="unreadable"):
            load_dataset("breastmnist", data_dir=tmp_path)
    assert "without an integrity check" in caplog.text


def test_download_is_verified_and_atomic(tmp_path, monkeypatch):
    """The download path, fed from a local file:// URL so no network is needed."""
    need(DATA / "breastmnist.npz")
    good = DATA / "breastmnist.npz"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:-10])
    monkeypatch.delenv("MEDHE_OFFLINE")
    dest = tmp_path / "dl"
    monkeypatch.setattr(medmnist.MedMNISTInfo, "url", lambda self, size: bad.as_uri())
    with pytest.raises(DataError, match="corrupted"):
        load_dataset("breastmnist", split="val", data_dir=dest)
    assert list(dest.iterdir()) == []  # no partial file left behind
    monkeypatch.setattr(medmnist.MedMNISTInfo, "url", lambda self, size: good.as_uri())
    assert len(load_dataset("breastmnist", split="val", data_dir=dest)) == 78
    assert [p.name for p in dest.iterdir()] == ["breastmnist.npz"]


def test_missing_file_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("pneumoniamnist", split="test", data_dir=tmp_path)
    msg = str(err.value)
    assert "pneumoniamnist.npz" in msg and str(tmp_path) in msg and "MEDHE_DATA" in msg and "\n" not in msg
    with pytest.raises(DataError, match="pneumoniamnist_64.npz"):
        load_dataset("pneumoniamnist", size=64, data_dir=tmp_path)
    with pytest.raises(DataError, match="28, 64, 128, 224"):
        load_dataset("pneumoniamnist", size=32, data_dir=tmp_path)


def test_unknown_names():
    with pytest.raises(DataError, match="did you mean 'pneumoniamnist'") as err:
        medmnist.medmnist_info("pneumonimnist")
    assert "organsmnist" in str(err.value)
    with pytest.raises(DataError, match="did you mean 'pneumoniamnist'"):
        load_dataset("pneumonia-mnist")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("breastmnist", split="training")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("./no/such/folder")


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDHE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MEDHE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir() == tmp_path / ".medhe" / "data"


# -- folders -------------------------------------------------------------------------------------------------------
def test_covid_folder_splits():
    need(COVID)
    splits = {s: load_dataset("covid19_radiography_subset", split=s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [566, 122, 122]
    paths = [set(splits[s].paths) for s in splits]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert len(set.union(*paths)) == 810
    for ds in splits.values():
        assert ds.task == "binary-class" and ds.label_names == ["COVID", "Normal"]
        assert ds.images.shape[1:] == (224, 224, 3) and ds.labels.shape == (len(ds), 1)
        covid_share = float(np.mean(ds.labels == 0))
        assert abs(covid_share - 402 / 810) < 0.01  # stratified
        assert all(p.startswith(("COVID/", "Normal/")) for p in ds.paths)
        assert all((p.startswith("COVID/")) == (y == 0) for p, y in zip(ds.paths, ds.labels[:, 0]))
    again = load_dataset(str(COVID), split="test", channels=1)  # by path; same split, gray
    assert again.paths == splits["test"].paths and again.images.shape == (122, 224, 224)
    assert np.array_equal(again.images, splits["test"].images[..., 0])  # R=G=B -> gray is exact
    assert len(load_dataset("covid19_radiography_subset", split="all")) == 810


def test_nih_folder_groups_and_labels():
    need(NIH)
    splits = {s: load_dataset("nih_chestxray14_subset", split=s) for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 417
    groups = [set(d.groups.tolist()) for d in splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for ds in splits.values():
        assert ds.task == "multi-label" and ds.labels.shape == (len(ds), 14) and ds.images.ndim == 3
        assert ds.label_names[0] == "Atelectasis" and ds.label_names[-1] == "Hernia"
        assert set(np.unique(ds.labels)) <= {0, 1}
    total = sum(d.labels.sum(0) for d in splits.values())
    assert total[0] == 59 and total[-1] == 14  # Atelectasis, Hernia counts from the README
    info = dataset_info("nih_chestxray14_subset")
    assert info["kind"] == "folder" and info["n_channels"] == 1 and info["task"] == "multi-label"


def _write_folder(root: Path, n: int = 12, classes: int = 3, size: int = 8, patients: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["path,label,label_index" + (",patient_id" if patients else "")]
    for i in range(n):
        k = i % classes
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        lines.append(f"img{i:02d}.png,class{k},{k}" + (f",p{i // 3}" if patients else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_generic_folder(tmp_path):
    root = _write_folder(tmp_path / "mine", n=20, classes=3)
    ds = load_dataset(root, split="all")
    assert ds.task == "multi-class" and ds.label_names == ["class0", "class1", "class2"] and len(ds) == 20
    assert ds.images.shape == (20, 8, 8) and ds.labels.dtype == np.int64
    assert load_dataset(root, split="all", size=4, channels=3).images.shape == (20, 4, 4, 3)
    sizes = [len(load_dataset(root, split=s)) for s in ("train", "val", "test")]
    assert sizes == [14, 3, 3]
    assert dataset_info(root)["task"] == "multi-class"
    # dataset.json overrides the task and names
    (root / "dataset.json").write_text('{"task": "ordinal-regression", "label_names": ["a", "b", "c"]}')
    with pytest.raises(DataError, match="'class0' in the CSV"):
        load_dataset(root)
    (root / "dataset.json").write_text('{"labelz": 1}')
    with pytest.raises(DataError, match="unknown key 'labelz'"):
        load_dataset(root)


def test_grouped_folder_keeps_patients_together(tmp_path):
    root = _write_folder(tmp_path / "pat", n=30, classes=2, patients=True)
    ds = load_dataset(root, split="all")
    assert ds.task == "binary-class" and ds.groups is not None
    parts = [set(load_dataset(root, split=s).groups.tolist()) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(set.union(*parts)) == 10


def test_folder_errors(tmp_path):
    root = _write_folder(tmp_path / "odd", n=4, classes=2)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "img02.png")
    with pytest.raises(DataError, match="img02.png is 8x9") as err:
        load_dataset(root, split="all")
    assert "size=" in str(err.value)
    assert load_dataset(root, split="all", size=8).images.shape == (4, 8, 8)
    (root / "labels.csv").write_text("path,finding\nimg00.png,1\n")
    with pytest.raises(DataError, match="label_index"):
        load_dataset(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="labels.csv"):
        load_dataset(empty)


# -- images --------------------------------------------------------------------------------------------------------
def test_read_png_jpeg_npy(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (10, 1))
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), gray)
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8 and abs(int(out[..., 0].mean()) - 200) <= 3
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (10, 12, 3)
    np.save(tmp_path / "f.npy", np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5))
    arr = read_image(tmp_path / "f.npy")
    assert arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_read_dicom(tmp_path):
    pixels = np.tile(np.arange(0, 4096, 256, dtype=np.uint16), (8, 1))  # 8x16 ramp 0..3840
    plain = read_image(_write_dicom(tmp_path / "a.dcm", pixels))
    assert plain.dtype == np.uint8 and plain.shape == (8, 16)
    # no window: the declared stored range (16 bits here) maps onto 0..255, not the image's own min..max (issue 32)
    assert np.array_equal(plain, np.rint(pixels * (255 / 65535)).astype(np.uint8))
    assert plain[0, 0] == 0 and np.all(np.diff(plain[0].astype(int)) > 0)
    inverted = read_image(_write_dicom(tmp_path / "b.dcm", pixels, "MONOCHROME1"))
    assert np.array_equal(inverted, 255 - plain)
    # rescale to "HU" -1000..2840 and window 0 +- 500: below the window black, above white
    windowed = read_image(_write_dicom(tmp_path / "c.dcm", pixels, RescaleSlope=1, RescaleIntercept=-1000,
                                       WindowCenter=0, WindowWidth=1000))
    hu = pixels[0].astype(float) - 1000
    assert np.all(windowed[0][hu <= -500] == 0) and np.all(windowed[0][hu >= 500] == 255)
    mid = windowed[0][(hu > -500) & (hu < 500)]
    assert mid.size and np.all((mid > 0) & (mid < 255))
    # no suffix: detected by the DICM magic
    shutil.copy(tmp_path / "a.dcm", tmp_path / "noext")
    assert np.array_equal(read_image(tmp_path / "noext"), plain)


def test_read_image_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage that is not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown format"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="bad.dcm"):
        read_image(tmp_path / "bad.dcm")


# -- preprocessing -------------------------------------------------------------------------------------------------
def test_preprocess_values_and_shapes():
    pre = Preprocess()
    img = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    x = Preprocess(size=2)(img)
    assert x.dtype == np.float32 and x.shape == (1, 2, 2)
    assert np.allclose(x, [[[-1, 1], [1, -1]]])
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[..., 1] = 255
    y = pre(rgb)
    assert y.shape == (1, 28, 28) and np.allclose(y, (round(255 * 0.587) / 255 - 0.5) / 0.5, atol=0.01)
    z = Preprocess(channels=3, size=16, crop="center", mean=[0.1, 0.2, 0.3], std=[1, 1, 1])(np.full((20, 30), 255,
                                                                                                    np.uint8))
    assert z.shape == (3, 16, 16) and np.allclose(z[:, 0, 0], [0.9, 0.8, 0.7])
    with pytest.raises(DataError, match="uint8"):
        pre(np.zeros((28, 28), np.float32))


def test_preprocess_batch_matches_single_and_is_fast():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5000, 28, 28), dtype=np.uint8)
    pre = Preprocess(channels=1, size=28)
    t = time.perf_counter()
    X = pre.batch(images)
    assert time.perf_counter() - t < 0.5
    assert X.shape == (5000, 1, 28, 28) and X.dtype == np.float32
    assert np.array_equal(X[7], pre(images[7]))
    small = Preprocess(channels=3, size=14, crop="center")
    rgb = rng.integers(0, 256, (4, 30, 28, 3), dtype=np.uint8)
    Y = small.batch(rgb)
    assert Y.shape == (4, 3, 14, 14) and np.array_equal(Y[2], small(rgb[2]))
    assert np.array_equal(small.batch(list(rgb)), Y)


def test_preprocess_round_trip_and_validation():
    pre = Preprocess(channels=3, size=64, crop="center", mean=[0.5, 0.4, 0.3], std=0.25)
    d = pre.to_dict()
    assert d == {"channels": 3, "size": 64, "crop": "center", "mean": [0.5, 0.4, 0.3], "std": 0.25}
    assert Preprocess.from_dict(d) == pre
    with pytest.raises(DataError, match="'sise'"):
        Preprocess.from_dict({"sise": 28})
    with pytest.raises(DataError, match="channels"):
        Preprocess(channels=2)
    with pytest.raises(DataError, match="crop"):
        Preprocess(crop="random")
    with pytest.raises(DataError, match="mean"):
        Preprocess(channels=3, mean=[0.5, 0.5])
    with pytest.raises(DataError, match="std"):
        Preprocess(std=0)
