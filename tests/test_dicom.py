"""DICOM views read through pydicom: files written by pydicom itself, and the compressed samples pydicom ships, read
back by data.open_image."""
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from conftest import ROOT
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (MPEG2MPML, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEG2000,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                         JPEGLSLossless, JPEGLSNearLossless, RLELossless, generate_uid)

from helpers.core.data import ALL_REGIONS, DataError, image_size, load_studies, open_image, study_images

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


# One bundled sample per compressed transfer syntax pydicom ships one of (pydicom 3.0.2's wheel; the others download
# on demand), each against a bundled file of the same image in a lossless coding: (sample, reference, largest
# difference in 8-bit levels). No bundled sample: JPEG Lossless Process 14 (relabelled below) and HTJ2K.
SAMPLES = {
    JPEGBaseline8Bit: ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 6),  # YBR_FULL colour
    JPEGLosslessSV1: ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0),
    JPEGLSLossless: ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),  # 16-bit signed MR
    JPEGLSNearLossless: ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 2),
    JPEG2000Lossless: ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),
    RLELossless: ("MR_small_RLE.dcm", "MR_small.dcm", 0),
}


def pixels(name):
    return np.asarray(open_image(get_testdata_file(name), "s1"), dtype=int)


@pytest.mark.parametrize("syntax", SAMPLES, ids=lambda syntax: syntax.name)
def test_each_compressed_syntax_pydicom_ships_a_sample_of_decodes_to_its_lossless_copy(syntax):
    sample, reference, tolerance = SAMPLES[syntax]
    assert pydicom.dcmread(get_testdata_file(sample)).file_meta.TransferSyntaxUID == syntax
    assert np.abs(pixels(sample) - pixels(reference)).max() <= tolerance


def test_jpeg_extended_12_bit_and_jpeg_2000_decode_one_image_alike():
    """JPGExtended.dcm (JPEG Extended, 12-bit, libjpeg) and JPEG2000.dcm (JPEG 2000, OpenJPEG) are two lossy codings
    of one NM image with no lossless copy bundled: two decoders must agree on the picture (another image: -0.2)."""
    assert {pydicom.dcmread(get_testdata_file(n)).file_meta.TransferSyntaxUID
            for n in ("JPGExtended.dcm", "JPEG2000.dcm")} == {JPEGExtended12Bit, JPEG2000}
    extended, j2k = pixels("JPGExtended.dcm")[..., 0], pixels("JPEG2000.dcm")[..., 0]
    assert extended.shape == (1024, 256) and np.corrcoef(extended.ravel(), j2k.ravel())[0, 1] > 0.9


def test_jpeg_lossless_process_14_decodes(tmp_path):
    """No Process 14 sample is bundled; a selection-value-1 stream is one, so the SV1 sample relabelled stands in."""
    dataset = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    dataset.file_meta.TransferSyntaxUID = JPEGLossless
    dataset.save_as(tmp_path / "p14.dcm")
    assert np.array_equal(np.asarray(open_image(tmp_path / "p14.dcm", "s1")), pixels("SC_rgb_rle.dcm"))


def test_a_decoder_failure_is_one_line_naming_each_plugin():
    """JPEG-lossy.dcm is broken on purpose (a scan end pydicom's own tests say no decoder accepts)."""
    with pytest.raises(DataError) as error:
        pixels("JPEG-lossy.dcm")
    assert "\n" not in str(error.value)
    assert "cannot decode the DICOM pixel data (RuntimeError: Unable to decode" in str(error.value)
    assert "plugins: pylibjpeg: libjpeg error" in str(error.value) and "; pillow: " in str(error.value)


def test_a_syntax_no_decoder_reads_is_refused_saying_what_to_export(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", encapsulate([b"\0\0\1\xb3 not decoded"]), syntax=MPEG2MPML, bits=8)
    with pytest.raises(DataError, match=r"cine.dcm: study s1: cannot read image \(pixel data in transfer syntax MPEG2 "
                                        r"Main Profile / Main Level \(1.2.840.10008.1.2.4.100\), which pydicom "
                                        r"cannot decode: export the view as .* uncompressed, JPEG or JPEG 2000"):
        open_image(path, "s1")


def test_a_missing_decoder_package_is_named():
    """Where pylibjpeg is not installed (a failed `pip install -r requirements.txt`), in a fresh interpreter."""
    script = ("import sys; sys.modules['pylibjpeg'] = None  # not installed\n"
              "from helpers.core.data import open_image\n"
              f"open_image({get_testdata_file('MR_small_jpeg_ls_lossless.dcm')!r}, 's1')")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    refusal = (f"DataError: {get_testdata_file('MR_small_jpeg_ls_lossless.dcm')}: study s1: cannot read image (pixel "
               f"data compressed as JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) and no decoder for it "
               f"is installed (requirements.txt has them: pip install -r requirements.txt): install one of: ")
    assert refusal in done.stderr
    assert "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg" in done.stderr


def test_a_file_without_the_preamble_reads_and_one_without_an_image_is_refused(tmp_path):
    """A bare dataset, as older exports write it: no preamble, no 'DICM', no meta header (so no transfer syntax)."""
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.preamble, dataset.file_meta = None, FileMetaDataset()
    dataset.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare.dcm").read_bytes()[:2] == b"\x08\x00"  # group 0008's first element, no preamble
    assert b"DICM" not in (tmp_path / "bare.dcm").read_bytes()
    assert np.array_equal(np.asarray(open_image(tmp_path / "bare.dcm", "s1")), pixels("MR_small.dcm"))
    del dataset.PixelData
    dataset.save_as(tmp_path / "no-image.dcm", implicit_vr=True, little_endian=True)
    with pytest.raises(DataError, match=r"no-image.dcm: study s1: cannot read image \(not a DICOM image: no 'DICM' "
                                        r"marker after a 128-byte preamble, and read without one it holds no pixel"):
        open_image(tmp_path / "no-image.dcm", "s1")


@pytest.mark.parametrize("sample", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_a_meta_header_without_its_transfer_syntax_reads_in_the_encoding_found(tmp_path, sample):
    """(0002,0010) deleted: pydicom finds the dataset's encoding (explicit or implicit VR, byte order) by itself."""
    dataset = pydicom.dcmread(get_testdata_file(sample))
    syntax = dataset.file_meta.TransferSyntaxUID
    del dataset.file_meta.TransferSyntaxUID
    dataset.save_as(tmp_path / "x.dcm", implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    assert "TransferSyntaxUID" not in pydicom.dcmread(tmp_path / "x.dcm").file_meta
    assert np.array_equal(np.asarray(open_image(tmp_path / "x.dcm", "s1")), pixels("MR_small.dcm"))


def test_compressed_pixel_data_without_its_transfer_syntax_is_refused_naming_the_file(tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    del dataset.file_meta.TransferSyntaxUID
    dataset.save_as(tmp_path / "j2k.dcm", implicit_vr=False, little_endian=True)
    with pytest.raises(DataError, match=r"j2k.dcm: study s1: cannot read image \(compressed pixel data, and no "
                                        r"transfer syntax \(0002,0010\) in the meta header to say how"):
        open_image(tmp_path / "j2k.dcm", "s1")


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
    with pytest.raises(DataError, match=r"fake.dcm: study s1: cannot read image \(not a DICOM image: no 'DICM'"):
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
    shutil.copy(get_testdata_file("JPGExtended.dcm"), folder / "2.dcm")  # compressed, as a PACS exports it
    study = load_studies(tmp_path)[0]
    assert [p.name for p in study.image_paths] == ["0.DCM", "1.png", "2.dcm"]
    first, second, third = study_images(study)
    assert first.mode == second.mode == third.mode == "RGB" and np.asarray(first)[0, 0, 0] == 255
    assert np.array_equal(np.asarray(third), pixels("JPGExtended.dcm"))
    # the token budget reads each view's size without decoding it (train_data.token_counts)
    assert [image_size(p, "a") for p in study.image_paths] == [first.size, second.size, third.size] == [
        (64, 64), (8, 8), (256, 1024)]
