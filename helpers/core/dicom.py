"""DICOM views through pydicom, as a radiologist's viewer shows them: the modality rescale (or Modality LUT), then the
VOI LUT or window, MONOCHROME1 inverted, scaled to 8 bits. Compressed pixel data (JPEG baseline, extended and lossless,
JPEG-LS, JPEG 2000, HTJ2K, RLE: what PACS exports hold) are decoded by pylibjpeg's plugins or Pillow, which
requirements.txt installs. A file without the 128-byte preamble and "DICM" marker, or whose meta header lacks its
transfer syntax, is read all the same: older exports write bare datasets. `data.open_image` calls it for `.dcm` files
and for any file with DICOM's marker; it raises ValueError saying what is wrong, and the caller names the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

PREAMBLE = 128  # bytes before the "DICM" marker of a DICOM Part 10 file
# A meta header without (0002,0010): uncompressed pixel data are in the encoding pydicom found reading the dataset,
# by (implicit VR, little endian)
NATIVE_SYNTAXES = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                   (False, False): ExplicitVRBigEndian}


def is_dicom(path: str | Path) -> bool:
    """Whether the file carries DICOM's marker (DICOM files from a PACS often have no extension)."""
    with open(path, "rb") as file:
        return file.read(PREAMBLE + 4)[PREAMBLE:] == b"DICM"


def _read_dataset(path: str | Path):
    """The file's dataset, its transfer syntax set. `force`: without the preamble and marker a file is read as a bare
    dataset, which any file then parses as: it must hold pixel data to count as an image."""
    try:
        dataset = pydicom.dcmread(path, force=True)
    except Exception as error:  # noqa: BLE001  pydicom raises many types for a truncated or corrupt file
        raise ValueError(f"corrupt DICOM file ({type(error).__name__}: {error})") from None
    if "PixelData" not in dataset:
        if dataset.preamble is None:
            raise ValueError("not a DICOM image: no 'DICM' marker after a 128-byte preamble, and read without one it "
                             "holds no pixel data")
        raise ValueError("DICOM file without pixel data (not an image: e.g. a structured report)")
    if not dataset.file_meta.get("TransferSyntaxUID"):
        if dataset["PixelData"].is_undefined_length:  # encapsulated: compressed, by a codec the file does not name
            raise ValueError("compressed pixel data, and no transfer syntax (0002,0010) in the meta header to say how: "
                             "export the view again with its meta header")
        dataset.file_meta.TransferSyntaxUID = NATIVE_SYNTAXES[dataset.original_encoding]
    return dataset


def _decoder_check(dataset) -> None:
    """Refuse pixel data that no installed decoder reads, saying what would."""
    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # video (MPEG, HEVC), JPEG 2000 Part 2, JPIP, JPEG XL, a private syntax
        raise ValueError(f"pixel data in transfer syntax {syntax.name} ({syntax}), which pydicom cannot decode: "
                         f"export the view as a single-frame DICOM in an uncompressed, JPEG or JPEG 2000 syntax, or as "
                         f"a PNG") from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies)
        raise ValueError(f"pixel data compressed as {syntax.name} ({syntax}) and no decoder for it is installed "
                         f"(requirements.txt has them: pip install -r requirements.txt): install one of: {options}")


def _voi_range(units: np.ndarray, dataset) -> tuple[float, float] | None:
    """The values the VOI LUT or window maps black and white to (None without either): what pydicom's own VOI gives
    the lowest and highest inputs of the modality output's type, since its output range depends on bits, sign and
    rescale."""
    if "VOILUTSequence" not in dataset and "WindowCenter" not in dataset:
        return None
    kind = units.dtype
    extremes = ([np.iinfo(kind).min, np.iinfo(kind).max] if np.issubdtype(kind, np.integer)  # a LUT indexes with them
                else [-2.0 ** 40, 2.0 ** 40])
    with np.errstate(over="ignore"):  # the sigmoid VOI function at the extremes
        ends = apply_voi_lut(np.array(extremes, dtype=kind), dataset)
    return float(np.min(ends)), float(np.max(ends))


def dicom_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the view `read_dicom` returns, from the dataset without decoding its pixel data."""
    dataset = _read_dataset(path)
    return int(dataset.Columns), int(dataset.Rows)


def read_dicom(path: str | Path) -> Image.Image:
    """One single-frame DICOM view as an 8-bit RGB image (see the module docstring)."""
    dataset = _read_dataset(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames): export the one view to use as a single-frame file")
    _decoder_check(dataset)
    try:
        pixels = dataset.pixel_array  # YBR colour is converted to RGB by pydicom
    except Exception as error:  # noqa: BLE001  a decoder's or a truncated pixel buffer's error
        first, *plugins = str(error).splitlines() or [""]  # pydicom gives each decoder plugin's failure a line
        reason = " ".join([first, "; ".join(line.strip() for line in plugins)]).strip()
        raise ValueError(f"cannot decode the DICOM pixel data ({type(error).__name__}: {reason})") from None
    photometric = dataset.get("PhotometricInterpretation", "")
    if dataset.get("SamplesPerPixel", 1) == 3:
        if pixels.dtype != np.uint8:
            raise ValueError(f"{photometric} DICOM with {dataset.BitsAllocated}-bit samples: only 8-bit colour is read")
        return Image.fromarray(pixels).convert("RGB")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric interpretation {photometric!r}: only MONOCHROME1/2 and RGB/YBR are read")
    units = apply_modality_lut(pixels, dataset)
    values = apply_voi_lut(units, dataset).astype(np.float64)
    low, high = _voi_range(units, dataset) or (values.min(), values.max())  # no VOI: the image's own range
    gray = np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # the lowest value is white
        gray = 1 - gray
    return Image.fromarray(np.round(gray * 255).astype(np.uint8)).convert("RGB")
