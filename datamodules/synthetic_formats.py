"""The file formats of the synthetic set: DDSM ``.ics`` + byte-swapped LJPEG, CBIS-DDSM DICOM, ROI files, CSVs.

Also the value conversions behind them: brightness in [0, 1] -> film optical density
(`od_from_brightness`) -> each scanning site's 12-bit digitiser grey levels (`grey_levels`, the inverse
of the readers' calibration formulas), and brightness -> uint16 DICOM values (`dicom_values`).
`datamodules.synthetic` draws the images and calls these writers; nothing here draws.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage

#: Native pixel spacing of every synthetic image (DDSM-like film digitised at 100 um).
NATIVE_SPACING_MM = 0.1
#: Optical density of an empty (black) film and of the densest tissue; grey levels come from these.
OD_BACKGROUND = 3.5
OD_DENSEST = 0.15
#: Root of every DICOM UID the generator draws.
UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."

#: DDSM scanning sites: case letter -> (DIGITIZER line, grey level from optical density).
DIGITISERS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "A": ("HOWTEK", lambda od: (3.789 - od) / 0.00094568),
    "B": ("LUMISYS LASER", lambda od: 4096.99 - 1009.01 * od),
    "C": ("LUMISYS LASER", lambda od: 4096.99 - 1009.01 * od),
    "D": ("HOWTEK", lambda od: (3.96604095240593 - od) / 0.00099055807612),
}

#: Columns of the CBIS-DDSM case-description CSVs (the two kinds spell "breast density" differently).
CSV_COLUMNS = {
    "mass": ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"],
    "calc": ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"],
}
#: Case-folder prefix of each (kind, split), as in CBIS-DDSM.
CASE_PREFIX = {("mass", "test"): "Mass-Test", ("mass", "train"): "Mass-Training",
               ("calc", "test"): "Calc-Test", ("calc", "train"): "Calc-Training"}


def od_from_brightness(brightness: np.ndarray) -> np.ndarray:
    """Film optical density for a brightness in [0, 1] (bright = dense tissue = low density on film)."""
    return OD_BACKGROUND - (OD_BACKGROUND - OD_DENSEST) * brightness.astype(np.float64)


def grey_levels(brightness: np.ndarray, letter: str) -> np.ndarray:
    """12-bit digitiser grey levels: the inverse of the site's optical-density formula (data README)."""
    _, gl_of_od = DIGITISERS[letter]
    return np.clip(np.rint(gl_of_od(od_from_brightness(brightness))), 0, 4095).astype(np.uint16)


def dicom_values(brightness: np.ndarray) -> np.ndarray:
    """uint16 MONOCHROME2 pixel values of a CBIS-DDSM-style full mammogram."""
    return np.clip(np.rint(brightness.astype(np.float64) * 65535.0), 0, 65535).astype(np.uint16)


def new_uid(rng: np.random.Generator) -> str:
    """A random DICOM UID under `UID_ROOT` (38 digits drawn from ``rng``)."""
    digits = rng.integers(0, 10, size=38)
    digits[0] = rng.integers(1, 10)
    return UID_ROOT + "".join(str(d) for d in digits)


def write_ljpeg(path: Path, grey: np.ndarray) -> None:
    """Lossless JPEG of the 12-bit grey levels, 16-bit words byte-swapped as in the real DDSM files."""
    swapped = grey.astype("<u2").byteswap()
    path.write_bytes(imagecodecs.ljpeg_encode(swapped, bitspersample=16))


def write_ics(path: Path, case_name: str, density: int, digitiser: str, age: int, study_date: str,
              views: dict[str, tuple[int, int]]) -> None:
    """DDSM ``.ics`` header in the real line format (LINES = rows, RESOLUTION in microns)."""
    lines = [" ", "ics_version 1.0", f"filename {case_name}", f"DATE_OF_STUDY {study_date}",
             f"PATIENT_AGE {age}", "FILM ", "FILM_TYPE REGULAR", f"DENSITY {density}",
             "DATE_DIGITIZED 28 4 1998 ", f"DIGITIZER {digitiser}", "SEQUENCE"]
    resolution = round(NATIVE_SPACING_MM * 1000)
    for view_name, (rows, cols) in views.items():
        lines.append(f"{view_name} LINES {rows} PIXELS_PER_LINE {cols} BITS_PER_PIXEL 12 "
                     f"RESOLUTION {resolution} NON_OVERLAY")
    path.write_text("\n".join(lines) + "\n")


def write_dicom(path: Path, pixels: np.ndarray, *, patient: str, study_uid: str, series_uid: str,
                sop_uid: str, description: str, side: str, view: str, instance: int) -> None:
    """Uncompressed (Implicit VR Little Endian) uint16 MONOCHROME2 secondary-capture DICOM, as CBIS-DDSM."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = UID_ROOT + "999"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20161004"
    ds.StudyTime = "120000"
    ds.Modality = "MG"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = description
    ds.PatientName = patient
    ds.PatientID = patient
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "DDSM"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.PatientOrientation = view
    ds.Laterality = side[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [NATIVE_SPACING_MM, NATIVE_SPACING_MM]
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_roi(root: Path, folder: str, pixels: np.ndarray, mask: np.ndarray, kind: str, side: str, view: str,
              rng: np.random.Generator) -> tuple[str, str]:
    """ROI mask (full size, 0/255) and crop DICOMs of one abnormality; returns their CSV paths (crop, mask).

    As in CBIS-DDSM, the ``000000`` / ``000001`` names do not reliably say which file is which: the CSV
    follows the dataset's usual naming, the files behind those names are sometimes swapped, and a few
    abnormalities keep crop and mask in separate series (both ``000000.dcm``).
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:  # a lesion clipped away entirely cannot happen (sites are inside the breast); keep safe
        ys, xs = np.array([pixels.shape[0] // 2]), np.array([pixels.shape[1] // 2])
    pad_y = max(8, int(0.15 * (ys.max() - ys.min() + 1)))
    pad_x = max(8, int(0.15 * (xs.max() - xs.min() + 1)))
    y0, y1 = max(0, ys.min() - pad_y), min(pixels.shape[0], ys.max() + pad_y + 1)
    x0, x1 = max(0, xs.min() - pad_x), min(pixels.shape[1], xs.max() + pad_x + 1)
    crop = pixels[y0:y1, x0:x1]
    roi = np.where(mask, 255, 0).astype(np.uint16)
    study = new_uid(rng)
    case = folder.rsplit("_", 1)[0]
    if rng.random() < 0.07:
        crop_series, mask_series = new_uid(rng), new_uid(rng)
        crop_rel = f"{folder}/{study}/{crop_series}/000000.dcm"
        mask_rel = f"{folder}/{study}/{mask_series}/000000.dcm"
        files = [(crop_rel, crop, crop_series, "cropped images"), (mask_rel, roi, mask_series, "ROI mask images")]
    else:
        series = new_uid(rng)
        crop_name, mask_name = ("000000", "000001") if kind == "mass" else ("000001", "000000")
        crop_rel = f"{folder}/{study}/{series}/{crop_name}.dcm"
        mask_rel = f"{folder}/{study}/{series}/{mask_name}.dcm"
        if rng.random() < 0.3:  # the name lies: the file called the crop holds the mask, and vice versa
            files = [(crop_rel, roi, series, "ROI mask images"), (mask_rel, crop, series, "ROI mask images")]
        else:
            files = [(crop_rel, crop, series, "ROI mask images"), (mask_rel, roi, series, "ROI mask images")]
    for instance, (rel, array, series_uid, description) in enumerate(files, start=1):
        write_dicom(root / rel, array, patient=folder, study_uid=study, series_uid=series_uid, sop_uid=new_uid(rng),
                    description=description, side=side, view=view, instance=instance)
    del case
    return crop_rel, mask_rel


def write_case_csv(path: Path, kind: str, rows: list[list[str]]) -> None:
    """A CBIS-DDSM case-description CSV (``kind`` "mass" or "calc"): the real header, CRLF records."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS[kind])
        writer.writerows(rows)
