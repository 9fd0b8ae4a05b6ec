"""The floor reader of users' own files: images of every depth, DICOM as a viewer shows it, NIfTI, DICOM series."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError
from common.reader import (
    Volume,
    file_kind,
    list_inputs,
    read_picture,
    read_volume,
    volume_as_nifti,
    write_dicom_series,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
SIIM_MONO1 = "siim_same_image_as_MONOCHROME1.dcm"
BRATS_FLAIR = "brats2015/test/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"


def _uncompressed(ds, path):
    """``ds`` re-saved uncompressed with its decoded pixels (so a test may change them)."""
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_16_bit_and_8_bit_images_in_every_container(tmp_path):
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).round().astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(ramp).save(tmp_path / "a.tif")
    eight = (ramp // 16).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "b.bmp")
    Image.fromarray(np.stack([eight] * 3 + [np.full_like(eight, 255)], -1), "RGBA").save(tmp_path / "c.png")
    expected = np.round(ramp / 4095 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_picture(tmp_path / "a.png"), expected)
    np.testing.assert_array_equal(read_picture(tmp_path / "a.tif"), expected)
    np.testing.assert_array_equal(read_picture(tmp_path / "b.bmp"), eight)
    assert read_picture(tmp_path / "c.png", "rgb").shape == (64, 64, 3)
    assert [file_kind(p) for p in sorted(tmp_path.iterdir())] == ["image"] * 4


def test_real_dicom_pair_monochrome1_inverts(shared_data, tmp_path):
    """The shared MONOCHROME1 file holds the MONOCHROME2 file's bytes with only the tag changed (one byte differs),
    so a correct reader shows it inverted; a truly inverted copy (pixels and tag) reads as the same array."""
    mono2 = read_picture(shared_data / "cxr_dicom" / SIIM)
    tagged = read_picture(shared_data / "cxr_dicom" / SIIM_MONO1)
    assert mono2.shape == (1024, 1024) and mono2.std() > 20
    np.testing.assert_allclose(tagged, 255 - mono2.astype(int), atol=1)  # halves round the same way both times
    ds = pydicom.dcmread(shared_data / "cxr_dicom" / SIIM)
    pixels = ds.pixel_array
    inverted = pixels.max() + pixels.min() - pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = inverted.astype(pixels.dtype).tobytes()
    ds.save_as(tmp_path / "mono1.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_picture(tmp_path / "mono1.dcm"), mono2)


def test_rescale_and_window_are_applied(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.WindowCenter, ds.WindowWidth = 40, 80  # a narrow soft-tissue window: most pixels saturate
    path = _uncompressed(ds, tmp_path / "ct.dcm")
    grey = read_picture(path)
    assert (grey[raw <= 0] == 0).all() and (grey[raw >= 80] == 255).all()
    inside = (raw > 5) & (raw < 75)
    assert inside.any() and np.corrcoef(grey[inside], raw[inside])[0, 1] > 0.99
    mr = read_picture(get_testdata_file("MR_small.dcm"))
    assert mr.dtype == np.uint8 and mr.shape == (64, 64) and mr.max() == 255


def test_rgb_and_big_endian_dicom():
    rgb = read_picture(get_testdata_file("ExplVR_BigEnd.dcm"), "rgb")
    assert rgb.shape[-1] == 3 and rgb.dtype == np.uint8
    assert read_picture(get_testdata_file("ExplVR_BigEnd.dcm"), "grey").ndim == 2


def test_undecodable_and_multiframe_dicom_are_one_line(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless, with junk for a codestream
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\xd8 not a codestream \xff\xd9"])
    ds.save_as(tmp_path / "jls.dcm")
    with pytest.raises(DataError, match="JPEG-LS Lossless") as err:
        read_picture(tmp_path / "jls.dcm")
    assert "\n" not in str(err.value)
    multi = pydicom.dcmread(_uncompressed(pydicom.dcmread(get_testdata_file("CT_small.dcm")), tmp_path / "multi.dcm"))
    multi.NumberOfFrames = 3
    multi.PixelData = multi.PixelData * 3
    multi.save_as(tmp_path / "multi.dcm")
    with pytest.raises(DataError, match="multi-frame DICOM \\(3 frames, Explicit VR Little Endian"):
        read_picture(tmp_path / "multi.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"nothing")
    with pytest.raises(DataError, match="junk.dcm"):
        read_picture(tmp_path / "junk.dcm")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not an image"):
        read_picture(tmp_path / "notes.txt")


def test_real_radiographs(shared_data):
    for path in [*(shared_data / "cxr_samples").glob("*.png"), *(shared_data / "cxr_tbx11k").glob("*.png")]:
        grey = read_picture(path)
        assert grey.ndim == 2 and grey.dtype == np.uint8 and grey.std() > 10, path


def test_nifti_checks(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    header = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).header.copy()
    header["srow_x"] = header["srow_y"] = header["srow_z"] = 0
    header["qform_code"], header["sform_code"] = 0, 1
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header=header), tmp_path / "zero.nii.gz")
    with pytest.raises(DataError, match="4-D"):
        read_volume(tmp_path / "four.nii.gz")
    with pytest.raises(DataError, match="affine is zero"):
        read_volume(tmp_path / "zero.nii.gz")
    with pytest.raises(DataError, match="not a volume"):
        read_volume(tmp_path)


def test_brats_volume_as_dicom_series_round_trips(shared_data, tmp_path):
    """A real BraTS FLAIR (stored L,P,S) written as DICOM slices reads back with the same voxels and RAS affine,
    and the slices shuffled on disk still sort by position."""
    original = read_volume(shared_data / BRATS_FLAIR)
    small = Volume(original.data[::4, ::4, ::4].copy(), original.affine @ np.diag([4, 4, 4, 1]))
    paths = write_dicom_series(small, tmp_path / "series")
    for i, path in enumerate(reversed(paths)):
        path.rename(path.with_name(f"img{i:03d}"))  # no suffix and reversed names: found by the DICM magic
    assert file_kind(tmp_path / "series") == "dicom_series"
    assert list_inputs(tmp_path / "series", "volume") == [tmp_path / "series"]
    back = read_volume(tmp_path / "series")
    np.testing.assert_allclose(back.affine, small.affine, atol=1e-4)
    np.testing.assert_allclose(back.data, small.data, atol=1e-3 * np.ptp(small.data))
    nifti = volume_as_nifti(tmp_path / "series", tmp_path / "scratch")
    np.testing.assert_allclose(read_volume(nifti).data, back.data)
    (tmp_path / "series" / "img000").unlink()
    (tmp_path / "series" / "img010").unlink()
    with pytest.raises(DataError, match="uneven slice spacing"):
        read_volume(tmp_path / "series")
