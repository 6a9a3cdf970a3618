"""DICOM views read through pydicom: every file here is written by pydicom itself, then read back by data.open_image."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEGBaseline8Bit,
                         JPEGLSLossless, generate_uid)

from helpers.data import ALL_REGIONS, DataError, load_studies, open_image, study_images

RAMP = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit level once


def write_dicom(path, pixels, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian, bits=12, shape=(64, 64),
                **attributes):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:] if isinstance(pixels, np.ndarray) else shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes() if isinstance(pixels, np.ndarray) else pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def gray(path):
    rgb = np.asarray(open_image(path, "s1"))
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all()
    return rgb[..., 0].astype(int)


def test_monochrome2_without_voi_spans_its_own_range_and_monochrome1_comes_out_inverted(tmp_path):
    plain = gray(write_dicom(tmp_path / "m2.dcm", RAMP))
    assert np.abs(plain - np.round(RAMP / 4095 * 255)).max() == 0
    inverted = gray(write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1"))
    assert np.array_equal(inverted, 255 - plain)  # MONOCHROME1: the lowest value is white
    assert inverted[0, 0] == 255 and inverted[-1, -1] == 0


def test_rescale_slope_and_intercept_then_the_window(tmp_path):
    center, width = 0.0, 200.0
    path = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=center,
                       WindowWidth=width)
    units = 2.0 * RAMP - 1024  # the modality rescale; the window is in these units
    # DICOM's LINEAR window (PS3.3 C.11.2.1.2), written out here independently of pydicom
    expected = np.clip((units - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert np.abs(gray(path) - expected).max() <= 1
    assert (gray(path) == 0).sum() == (units <= center - 0.5 - (width - 1) / 2).sum()  # below the window: black


def test_voi_lut_sequence_is_applied_before_the_window(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    curve = (np.sqrt(np.arange(4096) / 4095) * 4095).round().astype(int).tolist()  # a curve, not a line
    lut.add_new("LUTData", "US", curve)
    path = write_dicom(tmp_path / "lut.dcm", RAMP, VOILUTSequence=Sequence([lut]), WindowCenter=2048,
                       WindowWidth=10)  # the LUT wins over the window, as pydicom's prefer_lut does
    assert np.array_equal(gray(path), np.round(np.asarray(curve) / 4095 * 255).reshape(64, 64))


def test_multi_frame_is_refused_naming_the_file(tmp_path):
    frames = np.stack([RAMP, RAMP])
    path = write_dicom(tmp_path / "cine.dcm", frames, NumberOfFrames=2)
    with pytest.raises(DataError, match=r"cine.dcm: study s1: cannot read image \(multi-frame DICOM \(2 frames\)"):
        open_image(path, "s1")


def test_compressed_syntax_without_its_decoder_is_refused_naming_the_packages(tmp_path):
    assert not get_decoder(JPEGLSLossless).is_available, "this test needs an environment without a JPEG-LS decoder"
    path = write_dicom(tmp_path / "ls.dcm", encapsulate([b"\xff\xd8not decoded\xff\xd9"]), syntax=JPEGLSLossless,
                       bits=12)
    with pytest.raises(DataError, match=r"ls.dcm: study s1: .*JPEG-LS Lossless Image Compression .* no decoder for it "
                                        r"is installed: install one of: .*pylibjpeg-libjpeg"):
        open_image(path, "s1")


def test_compressed_syntax_with_a_decoder_reads(tmp_path):
    """JPEG baseline: pydicom decodes it with Pillow, which the project installs."""
    image = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG", quality=95)
    path = write_dicom(tmp_path / "jpeg.dcm", encapsulate([jpeg.getvalue()]), syntax=JPEGBaseline8Bit, bits=8)
    assert np.abs(gray(path) - np.round((image - image.min()) / (image.max() - image.min()) * 255)).max() <= 6


def test_dicom_without_extension_is_found_by_its_marker_and_bad_files_are_named(tmp_path):
    write_dicom(tmp_path / "m2.dcm", RAMP)
    shutil.copy(tmp_path / "m2.dcm", tmp_path / "IM0001")
    assert np.array_equal(gray(tmp_path / "IM0001"), gray(tmp_path / "m2.dcm"))
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(DataError, match=r"fake.dcm: study s1: cannot read image \(not a DICOM file"):
        open_image(tmp_path / "fake.dcm", "s1")
    whole = (tmp_path / "m2.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:len(whole) - 4000])  # a download cut short: pixel data missing
    with pytest.raises(DataError, match=r"cut.dcm: study s1: cannot read image \((corrupt DICOM|cannot decode)"):
        open_image(tmp_path / "cut.dcm", "s1")


def test_dcm_views_in_a_study_folder_load_for_training(tmp_path):
    report = {k: "" for k in ALL_REGIONS}
    annotation = {"train": [{"id": "a", "report": report}], "val": [], "test": []}
    (tmp_path / "annotation.json").write_text(json.dumps(annotation))
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    write_dicom(folder / "0.DCM", RAMP, photometric="MONOCHROME1")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "1.png")
    study = load_studies(tmp_path)[0]
    assert [p.name for p in study.image_paths] == ["0.DCM", "1.png"]
    first, second = study_images(study)
    assert first.mode == second.mode == "RGB" and np.asarray(first)[0, 0, 0] == 255
