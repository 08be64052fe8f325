"""DICOM out for a DICOM in: a DICOM Segmentation of the thresholded map and a Secondary Capture of the overlay.

Both are written with highdicom, in the source's study (same StudyInstanceUID, patient module copied by
highdicom), each in a new series, referencing the source series and instance: the Segmentation through
its source-image references, the Secondary Capture through ReferencedImageSequence / SourceImageSequence.
A PACS viewer shows them beside the mammogram they describe.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom

from datamodules.fileio import atomic_write

MANUFACTURER = "mammospn"
SOFTWARE_VERSION = "0.1.0"


def _read_source(path: Path) -> pydicom.Dataset:
    from datamodules.readers.dicom import _dcmread

    return _dcmread(path)


def _patient_defaults(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy with the type-2 patient/study attributes highdicom copies set (empty when the source lacks them)."""
    ds = pydicom.Dataset(ds) if not isinstance(ds, pydicom.dataset.FileDataset) else ds
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation when it is two valid biped values (CBIS-DDSM writes the view there)."""
    from highdicom.enum import PatientOrientationValuesBiped

    value = ds.get("PatientOrientation")
    values = [str(v) for v in value] if value is not None and not isinstance(value, str) else []
    if len(values) != 2:
        return None
    try:
        return PatientOrientationValuesBiped(values[0]).value, PatientOrientationValuesBiped(values[1]).value
    except ValueError:
        return None


def _native_mask(seg: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if seg.shape == (rows, cols):
        return seg.astype(bool)
    return cv2.resize(seg.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST) > 0


def write_dicom_outputs(source_path: str | Path, seg: np.ndarray, overlay_rgb: np.ndarray, base: Path,
                        model_name: str, threshold: float, threshold_rule: str) -> dict[str, Path]:
    """Writes ``<base>_seg.dcm`` (BINARY Segmentation of ``seg``, resampled nearest to the source grid) and
    ``<base>_overlay_sc.dcm`` (RGB Secondary Capture of ``overlay_rgb``); returns both paths."""
    source = _patient_defaults(_read_source(Path(source_path)))
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if k not in source]
    if missing:
        raise ValueError(f"{source_path} lacks {', '.join(missing)}: outputs could not reference it")
    with warnings.catch_warnings():
        # the source's own PatientName (CBIS-DDSM: one component) is copied as it is, not ours to fix
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        return _write(source, seg, overlay_rgb, base, model_name, threshold, threshold_rule)


def _write(source: pydicom.Dataset, seg: np.ndarray, overlay_rgb: np.ndarray, base: Path, model_name: str,
           threshold: float, threshold_rule: str) -> dict[str, Path]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rows, cols = int(source.Rows), int(source.Columns)
    mask = _native_mask(seg, rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"mammospn {model_name}", version=SOFTWARE_VERSION, family=codes.DCM.ArtificialIntelligence,
        parameters={"threshold": f"{threshold:.6g}", "threshold_rule": threshold_rule},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="anomaly above threshold",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg_ds = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        series_description=f"mammospn {model_name} anomaly segmentation",
        omit_empty_frames=False,
    )
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(overlay_rgb.astype(np.uint8)),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=902,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source) or ("A", "F"),
        series_description=f"mammospn {model_name} anomaly overlay",
    )
    if _orientation(source) is None:
        # The overlay is a rendered figure; without a valid source orientation it stays unknown
        # (PatientOrientation is type 2: present and empty), highdicom only accepts a value to start with.
        sc.PatientOrientation = ""
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.ReferencedImageSequence = [reference]
    sc.SourceImageSequence = [reference]
    if "SeriesInstanceUID" in source:
        series_ref = pydicom.Dataset()
        series_ref.SeriesInstanceUID = source.SeriesInstanceUID
        series_ref.ReferencedInstanceSequence = [reference]
        sc.ReferencedSeriesSequence = [series_ref]
    paths = {"segmentation_dcm": base.with_name(f"{base.name}_seg.dcm"),
             "overlay_dcm": base.with_name(f"{base.name}_overlay_sc.dcm")}
    for key, dataset in (("segmentation_dcm", seg_ds), ("overlay_dcm", sc)):
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        atomic_write(paths[key], buffer.getvalue())
    return paths
