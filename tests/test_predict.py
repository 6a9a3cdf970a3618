"""Your own X-ray: `inference.Predictor`, `python -m helpers predict` and the Gradio app, on a tiny run.

The app is served for real: launched on 127.0.0.1 (a free port), driven through gradio_client with a PNG and a JPEG
2000 DICOM view, closed on every path. Nothing leaves the machine: gradio's and the client's analytics are off, and
the hub is offline (conftest)."""
import socket

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless
from test_dicom import write_dicom
from tiny_run import make_run

from helpers import commands
from helpers.predict import app, inference
from helpers.core.data import DataError
from helpers.judge.servers import free_port

SAMPLE_VIEW = "CXR1209_IM-0142/0.png"
OVERLAYS = ["CXR1209_IM-0142_0_view1_attention.png", "CXR1209_IM-0142_0_view2_attention.png"]  # the folder names it


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, tiny_model_dir, sample_dir):
    run = make_run(tmp_path_factory.mktemp("artifacts"), tiny_model_dir, sample_dir)
    return inference.Predictor.load(run)


def dicom_of(png, path, invert=False):
    """The PNG's grey levels as a 16-bit DICOM whose window spans the 16 bits; MONOCHROME1 stores them inverted, as
    such a file does."""
    grey = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 257
    return write_dicom(path, 65535 - grey if invert else grey, photometric="MONOCHROME1" if invert else "MONOCHROME2",
                       bits=16, WindowCenter=32767.5, WindowWidth=65536)


def test_a_png_and_a_monochrome1_dicom_give_the_report_of_the_same_pixels(predictor, sample_dir, tmp_path):
    png = sample_dir / "images" / SAMPLE_VIEW
    dicom = dicom_of(png, tmp_path / "lateral.dcm", invert=True)
    result = predictor([png, dicom], tmp_path / "out")
    assert result["report"].splitlines()[0].startswith("Lung:") and len(result["report"].splitlines()) == 4
    assert [p.name for p in result["overlays"]] == OVERLAYS
    assert all(Image.open(p).size[0] > 100 for p in result["overlays"])
    # the inverted DICOM comes back as the PNG's pixels: two copies of the PNG write the same report
    assert predictor([png, png], tmp_path / "out2", attention=False)["text"] == result["text"]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")),
                          np.asarray(inference.study_images(inference.Study("d", "predict", None, None, [dicom]))[0]))


def test_bad_input_is_named_before_the_model_runs(predictor, sample_dir, tmp_path):
    png = sample_dir / "images" / SAMPLE_VIEW
    with pytest.raises(DataError, match=r"5 images given \(.*\): one study has 1 to 4 views"):
        predictor([png] * 5)
    with pytest.raises(DataError, match=r"missing.png: file not found"):
        predictor([png, tmp_path / "missing.png"])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes.png: study CXR1209_IM-0142_0: not an image"):
        predictor([png, tmp_path / "notes.png"])
    (tmp_path / "broken.dcm").write_bytes(dicom_of(png, tmp_path / "whole.dcm").read_bytes()[:2000])
    with pytest.raises(DataError, match=r"broken.dcm: study CXR1209_IM-0142_0: cannot read image"):
        predictor([png, tmp_path / "broken.dcm"])
    assert app.predict_uploads(predictor, [str(tmp_path / "notes.png")]) == (
        f"Cannot read the upload: {tmp_path / 'notes.png'}: study notes: not an image (neither PNG, JPEG nor DICOM)",
        [])


def test_a_failed_attention_map_never_blocks_the_report(predictor, sample_dir, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("eager attention over this prompt needs 40 GiB")

    monkeypatch.setattr(inference, "analyze_study", out_of_memory)
    result = predictor([sample_dir / "images" / SAMPLE_VIEW], tmp_path)
    assert result["overlays"] == [] and result["attention_error"].startswith("MemoryError: eager attention")
    assert "attention overlays skipped: MemoryError" in inference.in_words(result)
    text, overlays = app.predict_uploads(predictor, [str(sample_dir / "images" / SAMPLE_VIEW)])
    assert text.startswith(result["report"]) and "attention overlays skipped" in text and overlays == []


def test_the_app_is_not_started_headless(predictor, capsys):
    assert app.launch(predictor, interactive=False) is None
    assert "Gradio app not started: headless run" in capsys.readouterr().out


def test_predict_command_prints_the_report_and_writes_overlays(predictor, sample_dir, tmp_path, capsys):
    png = sample_dir / "images" / SAMPLE_VIEW
    dicom = dicom_of(png, tmp_path / "IM0001", invert=True)  # no extension: found by its DICOM marker
    artifacts = predictor.run.artifacts_dir
    commands.main(["predict", "--profile", "demo", "--artifacts-dir", str(artifacts), "--run-name", "tiny", str(png),
                   str(dicom)])
    lines = capsys.readouterr().out.splitlines()  # the settings first, then the report
    start = lines.index(f"CXR1209_IM-0142_0 ({png}, {dicom}):")
    assert lines[start + 1:start + 5] == predictor([png, png], attention=False)["report"].splitlines()
    overlays = sorted((artifacts / "generate" / "tiny" / "predict").glob("*.png"))
    assert [p.name for p in overlays] == OVERLAYS
    assert f"attention overlay: {overlays[0]}" in lines


@pytest.fixture
def served(predictor, tmp_path, monkeypatch):
    """(a client of the app, where its overlays go): the app launched, then closed whatever the test did."""
    from gradio_client import Client

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no version check, no usage report
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # uploads stay in the test's folder
    blocks = app.build(predictor, tmp_path / "overlays")
    try:
        port = free_port()
        blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=tmp_path / "downloads",
                     analytics_enabled=False), tmp_path / "overlays"
    finally:
        blocks.close()
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing answers on its port
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_the_app_reports_a_png_and_a_jpeg_2000_dicom_with_their_overlays(served, predictor, sample_dir,
                                                                          tmp_path):
    client, overlay_dir = served
    png = sample_dir / "images" / SAMPLE_VIEW
    dicom = pydicom.dcmread(dicom_of(png, tmp_path / "lateral.dcm"))  # the PNG's grey levels, 16 bits
    dicom.compress(JPEG2000Lossless)
    dicom.save_as(tmp_path / "lateral.dcm")
    from gradio_client import handle_file

    text, gallery = client.predict([handle_file(png), handle_file(tmp_path / "lateral.dcm")], api_name="/report")
    # the DICOM decodes to the PNG's pixels, so the report is the one of two copies of the PNG
    assert text == predictor([png, png], attention=False)["report"]
    assert [line.split(":")[0] for line in text.splitlines()] == ["Lung", "Heart", "Mediastinal", "Bone"]
    written = sorted(overlay_dir.glob("*.png"))
    assert [p.name.split("_")[-2:] for p in written] == [["view1", "attention.png"], ["view2", "attention.png"]]
    received = [np.asarray(Image.open(item["image"])) for item in gallery]
    assert len(received) == 2 and all(np.array_equal(r, np.asarray(Image.open(w))) for r, w in zip(received, written))


def test_a_bad_upload_comes_back_as_the_error_naming_the_file(served, tmp_path):
    client, _ = served
    from gradio_client import handle_file

    (tmp_path / "notes.png").write_text("not an image")
    text, gallery = client.predict([handle_file(tmp_path / "notes.png")], api_name="/report")
    assert text.startswith("Cannot read the upload: ") and text.endswith(
        "notes.png: study notes: not an image (neither PNG, JPEG nor DICOM)")
    assert gallery == []
