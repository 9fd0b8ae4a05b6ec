"""A user's own files, read the one way every ``predict`` and the web app read them.

Example:
    from common.reader import read_picture, read_volume
    grey = read_picture("scan.dcm", "grey")           # (H, W) uint8, as a radiologist's viewer would show it
    volume = read_volume("series_folder/")             # Volume(data (X, Y, Z) float32, affine RAS+ 4x4)

Formats:
    pictures   PNG, JPEG, TIFF, BMP (8- and 16-bit, grey, RGB, RGBA: ``common.images``) and single-frame DICOM.
               DICOM pixels go through the modality LUT (rescale slope/intercept), then the VOI LUT or the window
               when the file has one, then a linear map of their range to 0..255; MONOCHROME1 (white = low) is
               inverted, so the same picture stored either way reads as the same array; RGB/YBR colour becomes RGB.
               A multi-frame file, or pixel data no installed decoder reads, is one line naming the transfer syntax.
    volumes    NIfTI (``.nii``/``.nii.gz``) as stored, and a folder of single-frame DICOM slices as one volume:
               slices sorted along the normal of ImageOrientationPatient by ImagePositionPatient, the affine built
               from those tags and PixelSpacing, and turned from DICOM's LPS+ patient axes into nibabel's RAS+.
``volume_as_nifti`` hands a pipeline that reads NIfTI paths (a MONAI chain) a file it already reads,
so a DICOM series takes exactly the preprocessing a NIfTI would.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import DataError
from common.images import read_grey, read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE, VOLUME = "picture", "volume"


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def file_kind(path: Path | str) -> str | None:
    """``image``, ``dicom``, ``nifti``, ``dicom_series`` (a folder of DICOM files) or None for anything else."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return "dicom_series" if any(file_kind(p) == "dicom" for p in path.iterdir() if p.is_file()) else None
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(DICOM_SUFFIXES) or ("." not in name and _has_dicom_magic(path)):
        return "dicom"
    return None


def list_inputs(path: Path | str, kind: str) -> list[Path]:
    """The inputs a ``--input`` names: the file itself, or a folder's readable candidates, sorted by name.

    ``kind`` is ``picture`` (image and DICOM files) or ``volume`` (NIfTI files and DICOM-series folders; a folder
    of DICOM slices is itself one volume). Files of other types in a folder are returned too, so the caller lists
    them as skipped with a reason instead of dropping them silently (hidden files are ignored).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "--input does not exist")
    if path.is_file() or (kind == VOLUME and file_kind(path) == "dicom_series"):
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if kind == PICTURE:
        return [p for p in entries if p.is_file()]
    return [p for p in entries if p.is_file() or file_kind(p) == "dicom_series"]


# --- pictures ------------------------------------------------------------------------------------------------------

def _dataset(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise DataError(path, f"not a readable DICOM file ({type(err).__name__}: {str(err).splitlines()[0]})") \
            from err


def _syntax(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"{uid.name} ({uid})" if uid is not None else "unknown transfer syntax"


def _pixels(ds, path: Path) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(path, f"multi-frame DICOM ({frames} frames, {_syntax(ds)}); give one frame per file")
    if "PixelData" not in ds:
        raise DataError(path, "DICOM file holds no pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises RuntimeError/NotImplementedError/ValueError per missing decoder
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(path, f"cannot decode pixel data in {_syntax(ds)} ({reason[:160]})") from err


def dicom_display(path: Path | str) -> np.ndarray:
    """A single-frame DICOM as the picture it shows: (H, W) float64 grey, higher = brighter, or (H, W, 3) uint8.

    Grey: modality LUT (rescale), then the VOI LUT sequence or the first window when present, then MONOCHROME1
    inverted over the value range the previous step can produce (so an inverted copy maps back exactly).
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

    path = Path(path)
    ds = _dataset(path)
    pixels = _pixels(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return np.asarray(apply_color_lut(pixels, ds), dtype=np.float64).astype(np.uint8)
    if pixels.ndim == 3:
        if photometric.startswith("YBR"):
            try:
                pixels = convert_color_space(pixels, photometric, "RGB")
            except NotImplementedError as err:
                raise DataError(path, f"colour space {photometric} is not supported") from err
        if pixels.dtype != np.uint8:
            low, high = float(pixels.min()), float(pixels.max())
            pixels = np.round((pixels - low) / max(high - low, 1e-12) * 255)
        return pixels.astype(np.uint8)
    if pixels.ndim != 2:
        raise DataError(path, f"pixel array of shape {pixels.shape}; a single 2-D frame is expected")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    windowed = "VOILUTSequence" in ds or "WindowCenter" in ds
    if windowed:
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(path, "DICOM pixels hold non-finite values")
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    elif not photometric.startswith("MONOCHROME"):
        raise DataError(path, f"photometric interpretation {photometric!r} is not supported")
    return values


def _to_uint8(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def read_picture(path: Path | str, mode: str = "grey") -> np.ndarray:
    """An image or single-frame DICOM file as uint8 pixels: (H, W) for ``mode="grey"``, (H, W, 3) for ``"rgb"``.

    Raises:
        DataError: a missing, undecodable or unsupported file (a NIfTI or a volume included), naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    kind = file_kind(path)
    if kind == "image":
        image = read_grey(path) if mode == "grey" else read_rgb(path)
        return np.asarray(image)
    if kind == "dicom" or _has_dicom_magic(path):
        display = _to_uint8(dicom_display(path))
        if mode == "grey":
            return np.asarray(Image.fromarray(display).convert("L")) if display.ndim == 3 else display
        return display if display.ndim == 3 else np.repeat(display[..., None], 3, axis=-1)
    if kind == "nifti":
        raise DataError(path, "a NIfTI volume; this pipeline takes 2-D images (PNG, JPEG, TIFF, BMP or DICOM)")
    raise DataError(path, f"not an image this reader takes ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})")


# --- volumes -------------------------------------------------------------------------------------------------------

@dataclass
class Volume:
    """Voxels (X, Y, Z) in stored order and the RAS+ affine that places them (nibabel's convention)."""

    data: np.ndarray
    affine: np.ndarray


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _floats(ds, tag: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(tag)
    try:
        values = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(path, f"DICOM slice has no usable {tag}") from err
    if values.shape != (n,) or not np.isfinite(values).all():
        raise DataError(path, f"DICOM slice has no usable {tag}")
    return values


def read_dicom_series(folder: Path | str) -> Volume:
    """A folder of single-frame DICOM slices of one series as one volume with its RAS+ affine.

    Raises:
        DataError: no DICOM slices, slices of several series or orientations, two slices at one position,
            uneven spacing, or a slice that does not decode; naming the folder or the slice.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_kind(p) == "dicom") if folder.is_dir() else []
    if len(files) < 2:
        raise DataError(folder, "a DICOM series needs a folder with at least two slice files")
    headers = [(p, _dataset(p, stop_before_pixels=True)) for p in files]
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise DataError(folder, f"holds slices of {len(series)} series; put one series per folder")
    first_path, first = headers[0]
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = []
    for path, ds in headers:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), orientation, atol=1e-4):
            raise DataError(path, "slice orientation differs from the series' first slice")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    depth = np.array([float(positions[i] @ normal) for i in order])
    gaps = np.diff(depth)
    if np.any(gaps < 1e-6):
        raise DataError(folder, "two slices share one position; is a series duplicated?")
    if not np.allclose(gaps, gaps[0], rtol=1e-3, atol=1e-3):
        raise DataError(folder, f"uneven slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): a missing slice?")
    spacing = _floats(first, "PixelSpacing", 2, first_path)  # (between rows, between columns)
    slices = []
    from pydicom.pixels import apply_modality_lut

    for i in order:
        path = headers[i][0]
        ds = _dataset(path)
        pixels = _pixels(ds, path)
        if pixels.ndim != 2 or (slices and pixels.shape != slices[0].shape):
            raise DataError(path, f"slice of shape {pixels.shape} does not match the series")
        slices.append(np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32))
    # pixel_array is (rows, columns); nibabel's first voxel axis runs along a row (the column index).
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[order[0]]
    return Volume(np.ascontiguousarray(data), _LPS_TO_RAS @ lps)


def read_nifti(path: Path | str) -> Volume:
    """A 3-D NIfTI file as stored, refusing a 4th dimension and a zero or singular affine (one line each)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error...)
        raise DataError(path, f"not a readable NIfTI file ({type(err).__name__}: {str(err).splitlines()[0]})") \
            from err
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"is {data.ndim}-D with shape {data.shape}; one 3-D volume is expected")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, "the header's affine is zero, singular or not finite, so the voxels have no orientation")
    return Volume(data, affine)


def read_volume(path: Path | str) -> Volume:
    """A NIfTI file or a DICOM-series folder as a Volume; anything else is a DataError naming it."""
    path = Path(path)
    kind = file_kind(path) if path.exists() else None
    if kind == "nifti":
        return read_nifti(path)
    if kind == "dicom_series":
        return read_dicom_series(path)
    if not path.exists():
        raise DataError(path, "file not found")
    raise DataError(path, "not a volume: give a NIfTI file (.nii, .nii.gz) or a folder of DICOM slices")


def volume_as_nifti(path: Path | str, scratch: Path) -> Path:
    """``path`` itself for a NIfTI file, else the DICOM series written as ``scratch/<folder>.nii.gz``."""
    import nibabel as nib

    from common.rundir import atomic_write_bytes

    path = Path(path)
    if file_kind(path) == "nifti":
        read_nifti(path)
        return path
    volume = read_volume(path)
    target = Path(scratch) / f"{path.name}.nii.gz"
    image = nib.Nifti1Image(volume.data, volume.affine)
    atomic_write_bytes(target, image.to_bytes() if not target.name.endswith(".gz") else _gz(image))
    return target


def _gz(image) -> bytes:
    import gzip

    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def write_dicom_series(volume: Volume, folder: Path | str, series_uid: str | None = None,
                       description: str = "medvl") -> list[Path]:
    """Write a Volume as single-frame DICOM slices (int16 with rescale slope/intercept), one file per Z index.

    The inverse of ``read_dicom_series`` up to the int16 quantisation; for tests and for handing a NIfTI to tools
    that only take DICOM.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(_LPS_TO_RAS) @ volume.affine
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / zooms[0], lps[:3, 1] / zooms[1]
    data = np.asarray(volume.data, dtype=np.float64)
    low, high = float(data.min()), float(data.max())
    slope = max(high - low, 1e-12) / 65000.0
    intercept = low + 32500.0 * slope
    series_uid = series_uid or generate_uid()
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.Modality = series_uid, description, "MR"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps[:3, 3] + k * lps[:3, 2])]
        ds.PixelSpacing = [f"{zooms[1]:.6f}", f"{zooms[0]:.6f}"]
        ds.SliceThickness = f"{zooms[2]:.6f}"
        plane = np.round((data[:, :, k].T - intercept) / slope).clip(-32768, 32767).astype(np.int16)
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.PixelData = plane.tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def describe_kinds(kinds: Iterable[str]) -> str:
    """Human words for what a pipeline takes, for help text and the app."""
    words = {"picture": "PNG, JPEG, TIFF, BMP or DICOM image", "volume": "NIfTI volume or folder of DICOM slices"}
    return ", ".join(words[k] for k in kinds)


__all__ = ["IMAGE_SUFFIXES", "DICOM_SUFFIXES", "NIFTI_SUFFIXES", "PICTURE", "VOLUME", "Volume", "file_kind",
           "list_inputs", "dicom_display", "read_picture", "read_dicom_series", "read_nifti", "read_volume",
           "volume_as_nifti", "write_dicom_series", "describe_kinds"]
