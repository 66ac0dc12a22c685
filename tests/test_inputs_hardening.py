"""Image inputs, hardened (issue 32, items 14, 15, 17, 18), each through real files and a real ``medhe serve``:

- 14: decoding is bounded: a 20000x20000 PNG (a 390 KB file) and a 12000x12000 one, a DICOM and a .npy declaring
  too many pixels, are refused from their header with one line, no traceback and no leaked library warning;
- 15: inputs unlike the training images (a 1x1 PNG, a colour fundus photo) are refused by default before anything
  is sent, ``--allow-unusual`` diagnoses them marked unreliable, and real scans of every shipped model's data pass;
- 17: one intensity rule: a DICOM without window tags gives the same pixels as the PNG of the same values;
- 18: ``medhe predict --batch`` takes a folder of mixed image sizes and channels and preprocesses each image as
  single-image mode does (the encrypted run over such a folder: ``tests/test_service_batch.py``).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.data import Preprocess, load_dataset, read_image
from medhe.data.guard import check_image
from medhe.data.images import MAX_PIXELS
from medhe.errors import DataError, MedheError
from medhe.service.launch import ServerProcess

from dicom_files import write_dicom  # noqa: E402  (tests/, on pytest's path)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medhe", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def huge_png(path: Path, width: int, height: int) -> Path:
    """A real, valid all-black 8-bit PNG of any size, written in streamed chunks (a few hundred KB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def radiographs(data_dir) -> np.ndarray:
    return load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images


# -- 14: bounded decoding ------------------------------------------------------------------------------------------
def test_huge_images_are_refused_from_their_header(tmp_path):
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)  # 400 megapixels: PIL raised DecompressionBombError
    big = huge_png(tmp_path / "big.png", 12000, 12000)  # 144 megapixels: PIL warned and decoded 144 MB
    assert bomb.stat().st_size < 500_000
    for path, declared in ((bomb, "400 megapixels"), (big, "144 megapixels")):
        start = time.perf_counter()
        with pytest.raises(DataError) as err:
            read_image(path)
        assert time.perf_counter() - start < 2.0  # from the header: nothing decoded
        assert str(path) in str(err.value) and declared in str(err.value) and "\n" not in str(err.value)
    # what a user sees: one line, exit 2, no traceback and no DecompressionBombWarning (no server is needed:
    # the files are read before anything is contacted)
    for path in (bomb, big):
        line = one_line_error(run_cli("predict", "--server", "http://127.0.0.1:9", str(path)))
        assert str(path) in line and f"more than the {MAX_PIXELS // 1_000_000} megapixels" in line
        assert "export the scan at a smaller size" in line
    # the same bound for DICOM (Rows x Columns from the header, before pydicom decodes) and .npy (its header)
    dcm = write_dicom(tmp_path / "huge.dcm", np.zeros((4, 4), dtype=np.uint8), 8)
    import pydicom

    ds = pydicom.dcmread(dcm)
    ds.Rows, ds.Columns = 9000, 9000
    ds.save_as(dcm)
    with pytest.raises(DataError, match=r"9000x9000 pixels \(81 megapixels\), more than"):
        read_image(dcm)
    npy = tmp_path / "huge.npy"
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(7000, 7000)).flush()  # sparse on disk
    with pytest.raises(DataError, match=r"an array of 7000x7000 \(49 megapixels\)"):
        read_image(npy)
    ok = tmp_path / "ok.png"  # below the bound: read as before
    Image.fromarray(np.full((3000, 2000), 7, dtype=np.uint8)).save(ok)
    assert read_image(ok).shape == (3000, 2000)


# -- 17: one intensity rule for DICOM and PNG ------------------------------------------------------------------------
def test_dicom_without_window_gives_the_pixels_of_the_same_png(tmp_path, radiographs):
    # a real radiograph whose grey levels do not span 0..255 (a stretch would change every one of them)
    scan = next(img for img in radiographs if 10 < int(img.min()) and int(img.max()) < 245)
    scan = np.asarray(Image.fromarray(scan).resize((64, 64), Image.Resampling.BICUBIC))
    png = tmp_path / "scan.png"
    Image.fromarray(scan).save(png)
    dcm8 = write_dicom(tmp_path / "scan8.dcm", scan, 8)
    assert np.array_equal(read_image(dcm8), read_image(png)) and np.array_equal(read_image(png), scan)
    # 16-bit: the same 16-bit values as DICOM and as a 16-bit PNG give the same 8-bit pixels (value / 257)
    wide = scan.astype(np.uint16) * 257 + 100
    png16 = tmp_path / "scan16.png"
    Image.fromarray(wide).save(png16)
    assert Image.open(png16).mode.startswith("I;16")
    dcm16 = write_dicom(tmp_path / "scan16.dcm", wide, 16)
    assert np.array_equal(read_image(dcm16), read_image(png16))
    assert np.abs(read_image(dcm16).astype(int) - scan).max() == 0
    # 12 bits stored: the declared range 0..4095 maps onto 0..255, whatever the image's own min..max
    dcm12 = write_dicom(tmp_path / "scan12.dcm", scan.astype(np.uint16) * 16, 12)
    assert np.abs(read_image(dcm12).astype(int) - scan).max() <= 1
    # so the model gets the same input from either file
    pre = Preprocess(channels=1, size=28)
    assert np.array_equal(pre(read_image(dcm8)), pre(read_image(png)))
    # a window, when the file has one, still decides (PS3.3 C.11.2.1.2)
    windowed = read_image(write_dicom(tmp_path / "w.dcm", scan, 8, WindowCenter=128, WindowWidth=64))
    assert np.all(windowed[scan <= 96] == 0) and np.all(windowed[scan >= 160] == 255)
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", scan, 8, PhotometricInterpretation="MONOCHROME1"))
    assert np.array_equal(inverted, 255 - scan)


# -- 15: real scans are usual -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, folder", [
    ("covid-cxr-ckks", "covid19_radiography_large"),  # 224-pixel scans for a 256-pixel input
    ("covid-cxr", "covid19_radiography_subset"),
    ("pneumonia-cxr-ckks", "kermany_pneumonia_224"),
    ("cxr14-ckks", "nih_chestxray14_64px"),
    ("cxr14-latent", "nih_chestxray14_subset"),
])
def test_real_scans_of_each_shipped_model_are_not_refused(data_dir, model, folder):
    from medhe.models.artifact import PRETRAINED_DIR

    card = json.loads((PRETRAINED_DIR / model / "card.json").read_text())
    pre = Preprocess.from_dict(card["preprocessing"])
    paths = sorted(p for p in (data_dir / folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    paths = paths[:: max(1, len(paths) // 60)][:60]  # spread over the folder's classes
    assert len(paths) >= 50, folder
    flagged = [p.name for p in paths if check_image(read_image(p), pre)]
    assert len(flagged) <= 1, flagged


def test_no_scan_of_the_covid_subset_is_refused(data_dir):
    """Every one of its 810 real X-rays passes covid-cxr's checks (wide black borders reach 50 % pure pixels;
    four of them were flagged when flagged scans were only warned about)."""
    from medhe.models.artifact import PRETRAINED_DIR

    pre = Preprocess.from_dict(json.loads((PRETRAINED_DIR / "covid-cxr" / "card.json").read_text())["preprocessing"])
    paths = sorted((data_dir / "covid19_radiography_subset").rglob("*.png"))
    assert len(paths) == 810
    assert [p.name for p in paths if check_image(read_image(p), pre)] == []


# -- 15 and 18 through a real server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with ServerProcess(["pneumoniamnist:ckks"], workers=1, extra_args=["--audit-log", str(audit)]) as srv:
        srv.audit = audit
        yield srv


def sent_to(server) -> list[str]:
    """The routes the server's audit log has seen (key registrations and inferences)."""
    if not server.audit.exists():
        return []
    return [json.loads(line)["route"] for line in server.audit.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def unusual(tmp_path_factory, data_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("unusual")
    tiny = folder / "tiny.png"
    Image.fromarray(np.full((1, 1), 128, dtype=np.uint8)).save(tiny)
    fundus = load_dataset("retinamnist", split="test", size=28, data_dir=data_dir).images[0]  # a colour photo
    photo = folder / "photo.png"
    Image.fromarray(np.asarray(Image.fromarray(fundus).resize((64, 64), Image.Resampling.BICUBIC))).save(photo)
    return {"tiny": tiny, "photo": photo}


@pytest.mark.slow
def test_unusual_inputs_are_refused_by_default_and_marked_when_allowed(server, unusual, radiographs, tmp_path,
                                                                       capsys):
    before = sent_to(server)
    for name, path in unusual.items():
        assert medhe_main(["predict", "--server", server.url, "--json", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {path} looks unlike the model's training data")
        assert "nothing was sent" in err and "--allow-unusual" in err
        reason = {"tiny": "1x1 pixels, smaller than", "photo": "in colour"}[name]
        assert reason in err, err
    assert medhe_main(["predict", "--server", server.url, "--strict", str(unusual["tiny"])]) == 2  # as before
    capsys.readouterr()
    assert sent_to(server) == before  # no keys registered, no ciphertext sent
    # --allow-unusual diagnoses them, marked unreliable, and a real radiograph in the same run is not marked
    real = tmp_path / "real.png"
    Image.fromarray(radiographs[1]).save(real)
    assert medhe_main(["predict", "--server", server.url, "--json", "--allow-unusual",
                       str(unusual["tiny"]), str(unusual["photo"]), str(real)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["unreliable"] for r in results] == [True, True, False]
    assert results[0]["warnings"] and results[1]["warnings"] and results[2]["warnings"] == []
    assert medhe_main(["predict", "--server", server.url, "--allow-unusual", str(unusual["photo"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("[unreliable: unlike the training data]") and lines[1].startswith("  check: ")
    with pytest.raises(SystemExit):  # argparse: the two say opposite things
        medhe_main(["predict", "--server", server.url, "--strict", "--allow-unusual", str(real)])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_batch_refuses_an_unusual_image_before_any_key(server, unusual, radiographs, tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(radiographs[20 + i]).save(folder / f"scan{i}.png")
    (folder / "zz-tiny.png").write_bytes(unusual["tiny"].read_bytes())
    out = tmp_path / "dx.csv"
    before = sent_to(server)
    assert medhe_main(["predict", "--server", server.url, "--batch", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "zz-tiny.png looks unlike the model's training data" in err
    assert "--skip-bad" in err and "--allow-unusual" in err and not out.exists()
    assert sent_to(server) == before


@pytest.mark.slow
def test_sdk_refuses_unusual_images_by_default_and_marks_them_when_allowed(server, unusual, radiographs):
    """The SDK follows the CLI's and the page's rule: ``Client.diagnose``/``diagnose_many`` and
    ``BatchDiagnoser.diagnose`` refuse an unusual image (a file or an array) with one line before any key is
    registered or ciphertext sent; ``allow_unusual=True`` diagnoses it, ``unreliable`` and its reasons recorded.
    (A batch diagnosis itself is not run here: the server compiles its batch plan on first use, ~30 s.)"""
    from medhe.service.batch_client import BatchDiagnoser
    from medhe.service.client import Client

    photo = read_image(unusual["photo"])
    before = sent_to(server)
    with Client(server.url) as client:
        for image, name in ((unusual["tiny"], str(unusual["tiny"])), (photo, "the photo")):
            with pytest.raises(DataError) as err:
                client.diagnose(image, source=name if isinstance(image, np.ndarray) else None)
            text = str(err.value)
            assert text.startswith(f"{name} looks unlike the model's training data") and "\n" not in text, text
            assert "nothing was sent" in text and "allow_unusual=True" in text
        with pytest.raises(DataError, match=r"^image 2 \(and 1 more image\) looks unlike .* in colour"):
            client.diagnose_many([radiographs[1], photo, unusual["tiny"]], progress=False)
        assert client._sessions == {}  # refused before any key was generated
        batch = BatchDiagnoser(client)
        with pytest.raises(DataError, match=r"^photo.png looks unlike"):
            batch.diagnose([radiographs[1], photo], ["real.png", "photo.png"])
        assert sent_to(server) == before  # no keys registered, no ciphertext sent
        # allowed: diagnosed and marked; the real radiograph beside them is not
        results = client.diagnose_many([unusual["tiny"], photo, radiographs[1]], progress=False, allow_unusual=True)
        assert [r.unreliable for r in results] == [True, True, False]
        assert "1x1 pixels" in results[0].warnings[0] and "in colour" in results[1].warnings[0]
        assert results[2].warnings == [] and all(r.label in ("normal", "pneumonia") for r in results)
        assert results[0].to_dict()["unreliable"] is True and results[2].to_dict()["warnings"] == []
        one = client.diagnose(photo, source="photo", allow_unusual=True)
        assert one.unreliable and one.warnings == results[1].warnings
        assert client.diagnose(radiographs[1]).unreliable is False  # a usual image needs no flag
        client.forget_keys()
        with pytest.raises(MedheError, match="allow_unusual must be True or False"):
            client.diagnose(radiographs[1], allow_unusual="yes")


# -- 18: a batch of mixed sizes --------------------------------------------------------------------------------------
def test_batch_folder_of_mixed_sizes_is_read_and_preprocessed_like_single_images(tmp_path, radiographs):
    """The folder step used to refuse mixed sizes; now every image goes through the model's own preprocessing,
    one by one, exactly as single-image mode does (the encrypted end-to-end run over a mixed folder is
    tests/test_service_batch.py::test_predict_batch_matches_plain_inference)."""
    from medhe.cli.predict_batch import check_folder, read_folder

    shapes = [(28, 28), (56, 56), (40, 40), (64, 64, 3), (96, 90)]  # sizes, and a grey scan saved as RGB
    for i, shape in enumerate(shapes):
        img = np.asarray(Image.fromarray(radiographs[10 + i]).resize(shape[1::-1], Image.Resampling.BICUBIC))
        Image.fromarray(np.repeat(img[..., None], 3, axis=-1) if len(shape) == 3 else img).save(
            tmp_path / f"scan{i}.png")
    images, sources, skipped = read_folder(tmp_path)
    assert [img.shape for img in images] == shapes and skipped == []
    pre = Preprocess(channels=1, size=28)
    kept, kept_sources, warnings = check_folder(images, sources, skipped, pre.to_dict(), False, False)
    assert kept_sources == sources and warnings == [[]] * len(shapes)
    single = np.stack([pre(read_image(p)) for p in sources])  # what single-image mode encrypts, per file
    assert np.array_equal(pre.batch(kept), single)
