"""BraTS 2020 + TextBraTS phantom: FLAIR volumes from the MNI152 template with a tumour in a chosen hemisphere and
lobe, healthy controls without one, reports from a grammar, and the truth beside them.

    python -m common.phantoms brain --out data/brain_phantom --n 120 --seed 0 --size 64 64 48

Layout written (as ``MICCAI_BraTS2020_TrainingData`` with the TextBraTS report files inside the case folders)::

    BraTS20_Training_<NNN>/BraTS20_Training_<NNN>_flair.nii.gz     FLAIR, int16, skull-stripped (background 0)
    BraTS20_Training_<NNN>/BraTS20_Training_<NNN>_flair_text.txt   the report
    healthy/sub-<NNNN>.nii.gz      healthy controls; like the seed's ``HealthyBrains_Preprocessed`` they come
                                   without reports (the loader gives them template reports)
    truth.json                     per case: side, lobes, findings, tumour geometry, storage orientation
    report_archive.json            ~2000 reports of the same grammar about no case here: text to pre-train an LM on

Anatomy is the symmetric MNI152 2009a template that nilearn ships inside its package (grey matter, white matter
and T1, so it works offline), turned into FLAIR contrast (grey matter brighter than white matter, CSF dark) and
resampled to ``size`` voxels over a fixed 240 x 240 x 180 mm field of view (3.75 mm isotropic at the default
64 x 64 x 48; BraTS volumes span 240 x 240 x 155 mm). Each case gets its own random affine and smooth displacement,
bias field, gain and noise.

A tumour is an irregular ellipsoid placed in one lobe box (MNI coordinates) of the chosen hemisphere: a dark
necrotic core (in most tumours), a bright heterogeneous enhancing rim, and FLAIR-bright edema around it that stops
at the midline; large tumours push the surrounding tissue away (mass effect). About a tenth of the tumour cases are
bilateral (one tumour per hemisphere). Healthy volumes go through the same steps without a tumour.

Side is learnable from the volume and only from it: the template is left-right symmetric, every random draw other
than the tumour comes from a stream that does not depend on the side, and half of the volumes (chosen
independently of the side) are stored LPS, as BraTS stores them, the other half RAS. The array axis that runs
left to right is therefore flipped in half the files, and the side is read correctly only through the header's
affine (e.g. after MONAI's ``Orientation("RAS")``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from common.rundir import atomic_write_bytes, atomic_write_text

DEFAULT_N = 120
"""Tumour cases written by default; with ``n // 5`` healthy controls. 120 leaves 22 left/right test cases for the side
probe on a 70/10/20 split (60 left 10, too few to tell 0.85 from chance reliably)."""
DEFAULT_SIZE = (64, 64, 48)
"""Voxels along x (left to right), y (posterior to anterior), z (inferior to superior) of the written arrays."""
MIN_SIZE = 32
"""At 32 voxels a side a voxel is at most 7.5 mm, under the smallest enhancing core's radius (9.6 mm); coarser grids
blur the core into its edema."""
MAX_SIZE = 256
MIN_N = 10
"""Fewer tumour cases cannot fill a side-stratified train/val/test split with both sides in each part."""
ARCHIVE_FILE = "report_archive.json"
ARCHIVE_SIZE = 2000
"""Reports in ``report_archive.json`` (a JSON list of strings beside the cases; see ``report_archive``)."""
FOV_MM = (240.0, 240.0, 180.0)
FOV_CENTRE_MM = (0.0, -18.0, 12.0)
BILATERAL_FRACTION = 0.1
LPS_FRACTION = 0.5
SIDES = ("left", "right", "bilateral", "none")
LOBES = ("frontal", "parietal", "temporal", "occipital")
LOBE_BOXES_MM = {
    "frontal": ((18.0, 45.0), (8.0, 50.0), (0.0, 45.0)),
    "parietal": ((18.0, 45.0), (-70.0, -32.0), (25.0, 55.0)),
    "temporal": ((38.0, 55.0), (-40.0, 2.0), (-28.0, -8.0)),
    "occipital": ((12.0, 35.0), (-92.0, -76.0), (-2.0, 22.0)),
}
"""Lobe boxes as (|x|, y, z) ranges in MNI millimetres; x < 0 is the left hemisphere, x > 0 the right."""
TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}

# FLAIR levels (arbitrary units, x1000 when written): CSF suppressed, white matter below grey matter, edema above.
_GM, _WM, _CSF = 0.62, 0.48, 0.10
_EDEMA, _RIM, _NECROSIS = 1.0, 0.86, 0.28


@dataclass(frozen=True)
class Tumour:
    """One tumour in template (MNI) millimetres."""

    side: str
    lobe: str
    centre: tuple[float, float, float]
    edema_mm: float
    core_mm: float
    necrosis_mm: float
    axes: tuple[float, float, float]

    @property
    def diameter_cm(self) -> float:
        """Largest diameter of the enhancing tumour, as a report would give it."""
        return round(2 * self.core_mm * max(self.axes) / 10, 1)


@dataclass
class _Template:
    """The template prepared once per size: FLAIR contrast and tissue fraction on the MNI grid."""

    maps: torch.Tensor
    """(1, 2, Z, Y, X): FLAIR and tissue, in the (D, H, W) order ``grid_sample`` reads, sampled together."""
    tissue: np.ndarray
    """(X, Y, Z) tissue fraction, to check that a tumour centre lies in the brain."""
    inverse_affine: np.ndarray


def template_paths() -> dict[str, Path]:
    """The MNI152 files inside the installed nilearn package (what ``load_mni152_template`` reads, no download).

    Found without importing ``nilearn.datasets``, which pulls in scikit-learn and takes seconds.
    """
    spec = importlib.util.find_spec("nilearn")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" if spec else None
    if folder is None or not all((folder / name).is_file() for name in TEMPLATE_FILES.values()):
        from nilearn import datasets

        folder = Path(datasets.MNI152_FILE_PATH).parent
    return {key: folder / name for key, name in TEMPLATE_FILES.items()}


def spacing_mm(size: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(FOV_MM) / np.asarray(size, dtype=float)


def ras_affine(size: tuple[int, int, int]) -> np.ndarray:
    """Voxel (i, j, k) to RAS millimetres for an array whose axes run left->right, back->front, down->up."""
    spacing = spacing_mm(size)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(FOV_CENTRE_MM) - np.asarray(FOV_MM) / 2 + spacing / 2
    return affine


def _load_template(size: tuple[int, int, int]) -> _Template:
    images = {key: nib.load(path) for key, path in template_paths().items()}
    maps = {key: np.asarray(image.dataobj, dtype=np.float32) / 255 for key, image in images.items()}
    affine = images["t1"].affine
    if spacing_mm(size).min() >= 2.0:
        # Output voxels of 2 mm or more: average 2x2x2 blocks first, eight times less to hold and to smooth.
        maps = {key: _halve(volume) for key, volume in maps.items()}
        affine = affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]])
    gm, wm = maps["gm"], maps["wm"]
    brain = (maps["t1"] > 0.2).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0, 1)
    flair = (_GM * gm + _WM * wm + _CSF * csf) * brain
    tissue = np.clip(gm + wm, 0, 1) * brain
    # Smooth to the output voxel size before sampling, so that a coarse grid does not alias the anatomy.
    sigma = np.maximum(spacing_mm(size) * 0.4 / np.abs(np.diag(affine)[:3]), 0.5)
    flair, tissue = ndimage.gaussian_filter(flair, sigma), ndimage.gaussian_filter(tissue, sigma)
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack([flair, tissue]).transpose(0, 3, 2, 1)))[None]
    return _Template(maps=stacked, tissue=tissue, inverse_affine=np.linalg.inv(affine))


def _halve(volume: np.ndarray) -> np.ndarray:
    x, y, z = (s // 2 * 2 for s in volume.shape)
    return sum(volume[i:x:2, j:y:2, k:z:2] for i in (0, 1) for j in (0, 1) for k in (0, 1)) / 8


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, coarse: int = 4) -> np.ndarray:
    """A smooth random field of unit scale: a coarse Gaussian grid spread by separable Gaussian bumps.

    Separable matrices instead of ``ndimage.zoom``: the same smoothness at a hundredth of the time.
    """
    grid = rng.normal(0, 1, (coarse,) * len(shape))
    for axis, length in enumerate(shape):
        position = np.linspace(0, coarse - 1, length)[:, None]
        weights = np.exp(-((position - np.arange(coarse)[None, :]) ** 2) / 0.8)
        weights /= np.sqrt((weights**2).sum(1, keepdims=True))
        grid = np.moveaxis(np.tensordot(weights, np.moveaxis(grid, axis, 0), axes=(1, 0)), 0, axis)
    return grid.astype(np.float32)


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _voxel_world(size: tuple[int, int, int]) -> np.ndarray:
    """(X, Y, Z, 3) RAS millimetres of the voxel centres of the output grid."""
    affine = ras_affine(size)
    axes = [affine[a, a] * np.arange(size[a], dtype=np.float32) + affine[a, 3] for a in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32)


def _template_coordinates(size: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Where each output voxel samples the template: (X, Y, Z, 3) MNI millimetres after a random smooth warp.

    A random rotation (up to 5 degrees an axis), scaling (up to 6%), shift (up to 5 mm) and a displacement field
    of a few millimetres: drawn from distributions that are the same for a mirrored brain.
    """
    centre = np.asarray(FOV_CENTRE_MM, dtype=np.float32)
    linear = (_rotation(np.deg2rad(rng.uniform(-5, 5, 3))) @ np.diag(rng.uniform(0.94, 1.06, 3))).astype(np.float32)
    coords = (_voxel_world(size) - centre) @ linear.T + centre + rng.uniform(-5, 5, 3).astype(np.float32)
    amplitude = rng.uniform(1.5, 4.0)
    for axis in range(3):
        coords[..., axis] += amplitude * _smooth_field(size, rng)
    return coords


def _sample(template: _Template, coords_mm: np.ndarray) -> np.ndarray:
    """Trilinear samples of the template's maps at (X, Y, Z, 3) MNI millimetres: (2, X, Y, Z), 0 outside."""
    extent = np.asarray(template.maps.shape[:1:-1], dtype=np.float64) - 1
    to_grid = 2 * template.inverse_affine[:3] / extent[:, None]
    to_grid[:, 3] -= 1
    grid = coords_mm @ to_grid[:, :3].T.astype(np.float32) + to_grid[:, 3].astype(np.float32)
    sampled = torch.nn.functional.grid_sample(template.maps, torch.from_numpy(grid)[None], mode="bilinear",
                                              padding_mode="zeros", align_corners=True)
    return sampled[0].numpy()


def _tumour_size(rng: np.random.Generator) -> tuple[float, float, float, tuple[float, float, float]]:
    """Radii of edema, enhancing core and necrosis (0: none) in mm, and the axis scales of one tumour."""
    edema = float(rng.uniform(24, 36))
    core = edema * float(rng.uniform(0.4, 0.55))
    necrosis = core * float(rng.uniform(0.4, 0.6)) if rng.random() < 0.8 else 0.0
    axes = tuple(float(a) for a in rng.uniform(0.85, 1.15, 3))
    return edema, core, necrosis, axes


def draw_tumour(side: str, lobe: str, tissue: np.ndarray, inverse_affine: np.ndarray,
                rng: np.random.Generator) -> Tumour:
    """A tumour centred in brain tissue inside ``lobe``'s box of the ``side`` hemisphere."""
    box = LOBE_BOXES_MM[lobe]
    sign = -1.0 if side == "left" else 1.0
    edema, core, necrosis, axes = _tumour_size(rng)
    for _ in range(200):
        centre = np.array([sign * rng.uniform(*box[0]), rng.uniform(*box[1]), rng.uniform(*box[2])])
        if abs(centre[0]) < core + 4:
            continue
        index = inverse_affine[:3, :3] @ centre + inverse_affine[:3, 3]
        if ndimage.map_coordinates(tissue, index[:, None], order=1)[0] > 0.5:
            break
    return Tumour(side, lobe, tuple(float(c) for c in centre.round(1)), round(edema, 1), round(core, 1),
                  round(necrosis, 1), axes)


def _mass_effect(coords: np.ndarray, tumour: Tumour) -> np.ndarray:
    """Template coordinates pulled towards the centre, so that the tissue around a large tumour is pushed out."""
    offset = coords - np.asarray(tumour.centre, dtype=np.float32)
    sigma = 1.3 * tumour.edema_mm
    pull = 0.2 * np.exp(-(offset**2).sum(-1, keepdims=True) / (2 * sigma**2))
    return coords - offset * pull


def has_mass_effect(tumour: Tumour) -> bool:
    return tumour.edema_mm >= 31.0


_WOBBLE = 0.12
_EDEMA_WOBBLE = 0.2
"""Relative depth of the lobulated margins of the tumour and of its edema; the smooth fields they scale are clipped
to [-2, 2]."""


def _tumour_box(size: tuple[int, int, int], tumour: Tumour) -> tuple[slice, slice, slice]:
    """The output voxels the tumour can reach: its outer radius on the lobulated margin plus the largest warp."""
    reach = tumour.edema_mm * max(tumour.axes) / (1 - 2 * _EDEMA_WOBBLE) + 20.0
    affine = ras_affine(size)
    centre = (np.asarray(tumour.centre) - affine[:3, 3]) / np.diag(affine)[:3]
    half = reach / np.diag(affine)[:3]
    return tuple(slice(max(0, int(c - h)), min(s, int(np.ceil(c + h)) + 1)) for c, h, s in zip(centre, half, size))


def _paint(flair: np.ndarray, tissue: np.ndarray, brain: np.ndarray, coords: np.ndarray, tumour: Tumour,
           rng: np.random.Generator) -> None:
    """Edema, enhancing rim and necrotic core of one tumour, painted into ``flair`` (X, Y, Z) in place."""
    box = _tumour_box(flair.shape, tumour)
    shape = flair[box].shape
    where = coords[box]
    offset = (where - np.asarray(tumour.centre, dtype=np.float32)) / np.asarray(tumour.axes, dtype=np.float32)
    radius = np.sqrt((offset**2).sum(-1))
    d = radius * (1 + _WOBBLE * np.clip(_smooth_field(shape, rng, coarse=5), -2, 2))
    d_edema = radius * (1 + _EDEMA_WOBBLE * np.clip(_smooth_field(shape, rng, coarse=6), -2, 2))
    sign = -1.0 if tumour.side == "left" else 1.0
    # Edema follows white and grey matter and stops at the falx (the midline plane x = 0).
    hemisphere = 1 / (1 + np.exp(-sign * where[..., 0] / 2.0))
    edema = np.clip((tumour.edema_mm - d_edema) / 4.0, 0, 1) * np.clip(tissue[box] * 1.5, 0, 1) * hemisphere
    out = flair[box] * (1 - edema) + edema * _EDEMA * (1 + 0.06 * _smooth_field(shape, rng, coarse=8))
    core = np.clip((tumour.core_mm - d) / 2.0, 0, 1) * brain[box]
    speckle = ndimage.gaussian_filter(rng.normal(0, 1, shape), 0.7)
    out = out * (1 - core) + core * _RIM * (1 + 0.12 * speckle)
    if tumour.necrosis_mm > 0:
        necrosis = np.clip((tumour.necrosis_mm - d) / 2.0, 0, 1) * brain[box]
        out = out * (1 - necrosis) + necrosis * _NECROSIS
    flair[box] = out


def render(size: tuple[int, int, int], template: _Template, tumours: list[Tumour],
           anatomy_rng: np.random.Generator, tumour_rng: np.random.Generator) -> np.ndarray:
    """One FLAIR volume (X, Y, Z) in RAS voxel order, float32, 0 outside the brain."""
    coords = _template_coordinates(size, anatomy_rng)
    anatomy = coords
    for tumour in tumours:
        if has_mass_effect(tumour):
            anatomy = _mass_effect(anatomy, tumour)
    flair, tissue = _sample(template, anatomy)
    brain = (flair > 0.03).astype(np.float32)
    for tumour in tumours:
        _paint(flair, tissue, brain, coords, tumour, tumour_rng)
    bias = np.exp(0.04 * _smooth_field(size, anatomy_rng, coarse=3))
    flair = flair * bias * np.float32(anatomy_rng.uniform(0.85, 1.15))
    flair += anatomy_rng.normal(0, 0.015, size).astype(np.float32) * brain
    return np.clip(flair, 0, None) * brain


def nifti_bytes(volume_ras: np.ndarray, lps: bool) -> bytes:
    """A gzipped NIfTI-1 of an RAS-ordered array, stored RAS or (flipped, with its affine) LPS as BraTS is."""
    size = volume_ras.shape
    affine = ras_affine(size)
    data = np.round(volume_ras * 1000).astype(np.int16)
    if lps:
        data = data[::-1, ::-1, :]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [size[0] - 1, size[1] - 1]
        affine = affine @ flip
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # mtime=0 keeps the bytes identical for a seed.
    return gzip.compress(image.to_bytes(), compresslevel=4, mtime=0)


# --- reports ---------------------------------------------------------------------------------------------------

_SIGNAL = ("mixed high and low signals with patchy high-signal areas",
           "heterogeneous signal intensity and speckled high-signal regions",
           "an uneven mixture of high and low signals",
           "mixed signal intensities with scattered high-signal foci")
_EDEMA_DEGREE = {"mild": ("mild", "limited"), "moderate": ("moderate", "noticeable"),
                 "severe": ("significant", "extensive")}
_NECROSIS_SEEN = ("appearing as an irregular low-signal region within the higher-signal tumor rim",
                  "with a mottled appearance surrounded by the enhancing margin",
                  "concentrated in the center of the lesion with uneven low signal")
_NO_NECROSIS = ("Necrosis is not clearly observed, and the lesion core appears solid.",
                "Necrosis is not evident; no central low-signal area is seen.")


def size_word(tumour: Tumour) -> str:
    return "small" if tumour.diameter_cm < 2.5 else ("large" if tumour.diameter_cm >= 3.5 else "medium")


def edema_degree(tumour: Tumour) -> str:
    return "mild" if tumour.edema_mm < 28 else ("moderate" if tumour.edema_mm < 32 else "severe")


def _location(tumours: list[Tumour]) -> str:
    if len(tumours) == 1:
        return f"the {tumours[0].side} {tumours[0].lobe} lobe"
    left, right = sorted(tumours, key=lambda t: t.side != "left")
    if left.lobe == right.lobe:
        return f"the bilateral {left.lobe} lobes"
    return f"the left {left.lobe} lobe and the right {right.lobe} lobe"


def report(tumours: list[Tumour], rng: np.random.Generator) -> str:
    """A TextBraTS-style report (lesion area, size and margin, edema, necrosis, ventricles) derived from truth."""
    place = _location(tumours)
    biggest = max(tumours, key=lambda t: t.edema_mm)
    signal = _SIGNAL[int(rng.integers(len(_SIGNAL)))]
    opening = (f"The lesion area is in {place} with {signal}.", f"The lesion area is located in {place}, showing "
               f"{signal}.", f"A mass lesion is seen in {place} with {signal}.")[int(rng.integers(3))]
    count = "Two lesions are present, the larger" if len(tumours) > 1 else "The lesion"
    size = (f"{count} measures approximately {biggest.diameter_cm:.1f} cm in its largest diameter, a "
            f"{size_word(biggest)} tumor with an irregular margin of enhancement.")
    degree = _EDEMA_DEGREE[edema_degree(biggest)][int(rng.integers(2))]
    edema = (f"Edema is {degree}, surrounding the lesion in {place} as a high signal, indicating swelling of the "
             "adjacent tissue." if rng.random() < 0.5 else
             f"Edema is observed around the lesion in {place} with {degree} high signal extending into the nearby "
             "white matter.")
    necrotic = [t for t in tumours if t.necrosis_mm > 0]
    necrosis = (f"Necrosis is present, {_NECROSIS_SEEN[int(rng.integers(len(_NECROSIS_SEEN)))]}." if necrotic
                else _NO_NECROSIS[int(rng.integers(len(_NO_NECROSIS)))])
    pushing = [t for t in tumours if has_mass_effect(t)]
    if not pushing:
        ventricles = ("Ventricular compression is not observed.",
                      "Ventricular compression is not seen, and the midline structures are preserved.")[
            int(rng.integers(2))]
    elif len(pushing) == 1:
        ventricles = (f"Ventricular compression is seen, with the {pushing[0].side} lateral ventricle narrowed and "
                      "deformed, indicating a mass effect.")
    else:
        ventricles = "Ventricular compression is seen on both lateral ventricles, indicating a mass effect."
    return " ".join((opening, size, edema, necrosis, ventricles))


def findings(tumours: list[Tumour]) -> dict:
    """What a report about these tumours must say (empty tumours: a healthy brain)."""
    if not tumours:
        return {"tumor": False, "edema": False, "enhancement": False, "necrosis": False, "mass_effect": False,
                "ventricular_compression": False, "size": "none", "edema_degree": "none", "diameter_cm": 0.0}
    biggest = max(tumours, key=lambda t: t.edema_mm)
    mass = any(has_mass_effect(t) for t in tumours)
    return {"tumor": True, "edema": True, "enhancement": True, "necrosis": any(t.necrosis_mm > 0 for t in tumours),
            "mass_effect": mass, "ventricular_compression": mass, "size": size_word(biggest),
            "edema_degree": edema_degree(biggest), "diameter_cm": biggest.diameter_cm}


def report_archive(n: int = ARCHIVE_SIZE, seed: int = 0) -> list[str]:
    """``n`` reports in the phantom's language about tumours drawn at random, with no volume behind them.

    A hospital holds far more report text than annotated scans; this is the phantom's stand-in, for the language
    pre-training of an offline LM twin (MedGemma arrives knowing how reports are written). No report describes a
    case of the data set: sides, lobes and sizes are drawn afresh (a tenth bilateral, as in the cases), and
    ``write_brain`` leaves out a draw that happens to equal a case's report word for word.
    """
    rng = np.random.default_rng([seed, 3])
    sides = plan_sides(n, rng)
    texts = []
    for side in sides:
        placed = ([("left", LOBES[int(rng.integers(len(LOBES)))]), ("right", LOBES[int(rng.integers(len(LOBES)))])]
                  if side == "bilateral" else [(side, LOBES[int(rng.integers(len(LOBES)))])])
        tumours = []
        for tumour_side, lobe in placed:
            edema, core, necrosis, axes = _tumour_size(rng)
            tumours.append(Tumour(tumour_side, lobe, (0.0, 0.0, 0.0), round(edema, 1), round(core, 1),
                                  round(necrosis, 1), axes))
        texts.append(report(tumours, rng))
    return texts


# --- writing ---------------------------------------------------------------------------------------------------

def case_id(number: int) -> str:
    return f"BraTS20_Training_{number:03d}"


def healthy_id(number: int) -> str:
    return f"sub-{number:04d}"


def _balanced(values: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` values, each as often as possible, in a random order."""
    return [str(v) for v in rng.permutation(np.resize(np.asarray(values), n))]


def plan_sides(n: int, rng: np.random.Generator) -> list[str]:
    """Sides of ``n`` tumour cases: a tenth bilateral, the rest half left and half right, shuffled."""
    bilateral = int(round(BILATERAL_FRACTION * n))
    lateral = _balanced(("left", "right"), n - bilateral, rng)
    return [str(s) for s in rng.permutation(np.asarray(lateral + ["bilateral"] * bilateral))]


def write_brain(out_dir: Path, n: int = DEFAULT_N, seed: int = 0, size: tuple[int, int, int] = DEFAULT_SIZE,
                n_healthy: int | None = None) -> Path:
    """Write the phantom into ``out_dir``: ``n`` tumour cases and ``n_healthy`` (default ``n // 5``) controls.

    Returns:
        The path of ``truth.json``.
    """
    out_dir = Path(out_dir)
    size = tuple(int(s) for s in size)
    n_healthy = max(1, n // 5) if n_healthy is None else n_healthy
    template = _load_template(size)
    plan = np.random.default_rng([seed, 0])
    sides = plan_sides(n, plan)
    lobes = _balanced(LOBES, n, plan)
    stored_lps = plan.random(n + n_healthy) < LPS_FRACTION
    case_reports: set[str] = set()
    truth: dict = {"size": list(size), "spacing_mm": spacing_mm(size).round(4).tolist(), "seed": seed,
                   "axes": "x left->right, y posterior->anterior, z inferior->superior (RAS)", "cases": {}}
    for k in range(n + n_healthy):
        healthy = k >= n
        anatomy_rng = np.random.default_rng([seed, 1, k])
        tumour_rng = np.random.default_rng([seed, 2, k])
        tumours: list[Tumour] = []
        if not healthy:
            if sides[k] == "bilateral":
                second = LOBES[int(tumour_rng.integers(len(LOBES)))]
                placed = [("left", lobes[k]), ("right", second)]
            else:
                placed = [(sides[k], lobes[k])]
            tumours = [draw_tumour(s, lobe, template.tissue, template.inverse_affine, tumour_rng)
                       for s, lobe in placed]
        volume = render(size, template, tumours, anatomy_rng, tumour_rng)
        data = nifti_bytes(volume, lps=bool(stored_lps[k]))
        if healthy:
            name = healthy_id(k - n + 1)
            atomic_write_bytes(out_dir / "healthy" / f"{name}.nii.gz", data)
        else:
            name = case_id(k + 1)
            atomic_write_bytes(out_dir / name / f"{name}_flair.nii.gz", data)
            text = report(tumours, tumour_rng)
            case_reports.add(text)
            atomic_write_text(out_dir / name / f"{name}_flair_text.txt", text + "\n")
        truth["cases"][name] = {
            "healthy": healthy, "side": "none" if healthy else sides[k],
            "lobes": sorted({t.lobe for t in tumours}), "findings": findings(tumours),
            "stored_orientation": "LPS" if stored_lps[k] else "RAS",
            "tumours": [{"side": t.side, "lobe": t.lobe, "centre_mni_mm": list(t.centre), "edema_radius_mm": t.edema_mm,
                         "core_radius_mm": t.core_mm, "necrosis_radius_mm": t.necrosis_mm} for t in tumours]}
    # A draw can repeat a case's report word for word (1 of 120 on the default phantom): such texts are left out.
    archive = [text for text in report_archive(seed=seed) if text not in case_reports]
    atomic_write_text(out_dir / ARCHIVE_FILE, json.dumps(archive, indent=0) + "\n")
    return atomic_write_text(out_dir / "truth.json", json.dumps(truth, indent=1) + "\n")


__all__ = ["write_brain", "render", "report", "report_archive", "findings", "draw_tumour", "plan_sides",
           "nifti_bytes", "ras_affine", "template_paths", "Tumour", "case_id", "healthy_id", "DEFAULT_N",
           "DEFAULT_SIZE", "MIN_SIZE", "MAX_SIZE", "MIN_N", "SIDES", "LOBES", "LOBE_BOXES_MM", "ARCHIVE_FILE",
           "ARCHIVE_SIZE"]
