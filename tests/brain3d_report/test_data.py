"""brain3d_report.data: layouts, reports, splits, healthy templates, MONAI preprocessing, cache, and bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brain3d_report import data
from brain3d_report.data import (
    HEALTHY_TEMPLATES,
    LeftRightMirror,
    MirroredPairs,
    check_volume_size,
    healthy_report,
    load_cases,
    load_volume,
    make_dataset,
    mirror_report,
    mirror_volumes,
    official_split,
    packaged_file,
    report_side,
    save_split,
)
from common.errors import ConfigError, DataError
from common.phantoms.brain import nifti_bytes
from common.splits import load_split_csv

SIZE = (40, 48, 32)  # the shared brain_phantom's (tests/conftest.py)
VOLUME = (16, 24, 24)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantom(brain_phantom) -> tuple[Path, dict]:
    root, truth = brain_phantom
    return root, truth["cases"]


def _flair(root: Path, case_id: str) -> Path:
    return root / case_id / f"{case_id}_flair.nii.gz"


def _copy_case(src: Path, dst: Path, case_id: str, new_id: str | None = None, flair_suffix: str = "_flair.nii.gz",
               report: bool = True) -> None:
    new_id = new_id or case_id
    (dst / new_id).mkdir(parents=True)
    shutil.copy(_flair(src, case_id), dst / new_id / f"{new_id}{flair_suffix}")
    if report:
        shutil.copy(src / case_id / f"{case_id}_flair_text.txt", dst / new_id / f"{new_id}_flair_text.txt")


def _small_tree(phantom, tmp_path: Path) -> Path:
    """Three tumour cases and two healthy controls copied from the phantom."""
    src, _ = phantom
    root = tmp_path / "root"
    for k in (1, 2, 3):
        _copy_case(src, root, f"BraTS20_Training_{k:03d}")
    (root / "healthy").mkdir()
    for name in ("sub-0001", "sub-0002"):
        shutil.copy(src / "healthy" / f"{name}.nii.gz", root / "healthy" / f"{name}.nii.gz")
    return root


# --- layouts and reports ---------------------------------------------------------------------------------------------

def test_brats2020_layout_with_report_files(phantom):
    root, truth = phantom
    cases = load_cases(root)
    assert cases.ids == sorted(k for k in truth if not truth[k]["healthy"]) + sorted(k for k in truth if
                                                                                    truth[k]["healthy"])
    for case in cases:
        assert case.side == truth[case.id]["side"] and case.healthy == truth[case.id]["healthy"]
        if case.healthy:
            assert case.flair == root / "healthy" / f"{case.id}.nii.gz" and case.report == healthy_report(case.id)
        else:
            assert case.flair == _flair(root, case.id)
            assert case.report == (root / case.id / f"{case.id}_flair_text.txt").read_text().strip()
    assert {c.split for c in cases} == {"train", "val", "test"} and not cases.skipped


def test_brats2023_names_json_reports_and_a_separate_report_tree(phantom, tmp_path):
    src, truth = phantom
    root, tree = tmp_path / "images", tmp_path / "TextBraTSData"
    mapping = {}
    for k, new_id in enumerate(("BraTS-GLI-00002-000", "BraTS-GLI-00003-001"), start=1):
        case_id = f"BraTS20_Training_{k:03d}"
        _copy_case(src, root, case_id, new_id, flair_suffix="-t2f.nii.gz", report=False)
        (root / new_id / f"{new_id}-t1c.nii.gz").write_bytes(b"")  # other sequences are not read
        mapping[new_id] = (src / case_id / f"{case_id}_flair_text.txt").read_text()
        (tree / new_id).mkdir(parents=True)
        (tree / new_id / f"{new_id}_flair_text.txt").write_text(mapping[new_id])
    (tmp_path / "reports.json").write_text(json.dumps(mapping))
    for reports in (tmp_path / "reports.json", tree):
        cases = load_cases(root, reports=reports, split=None)
        assert [c.flair.name for c in cases] == ["BraTS-GLI-00002-000-t2f.nii.gz", "BraTS-GLI-00003-001-t2f.nii.gz"]
        assert [c.report for c in cases] == [" ".join(mapping[i].split()) for i in cases.ids]
        assert [c.side for c in cases] == [truth[f"BraTS20_Training_{k:03d}"]["side"] for k in (1, 2)]
        assert {c.split for c in cases} == {""}


def test_packaged_textbrats_reports_and_split(phantom, shared_data):
    for name in ("reports.json", "Train.json", "Test.json"):
        assert packaged_file(name).read_bytes() == (shared_data / "textbrats" / name).read_bytes()
    notice = (REPO / "brain3d_report" / "textbrats" / "NOTICE.md").read_text()
    assert "MIT" in notice and "TextBraTS" in notice
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'brain3d_report = ["textbrats/*.json", "textbrats/NOTICE.md"]' in pyproject and '"monai>=' in pyproject


def test_official_split_reads_the_textbrats_datalists(phantom):
    split = official_split()
    train = json.loads(packaged_file("Train.json").read_text())["training"]
    test = json.loads(packaged_file("Test.json").read_text())["training"]
    name = lambda entry: Path(entry["image"][0]).name.removesuffix("_flair.nii.gz")  # noqa: E731
    assert {name(e) for e in test} == {k for k, s in split.items() if s == "test"}
    assert {name(e) for e in train if e["fold"] == 0} == {k for k, s in split.items() if s == "val"}
    assert {name(e) for e in train if e["fold"] == 1} == {k for k, s in split.items() if s == "train"}
    assert set(split) == set(json.loads(packaged_file("reports.json").read_text()))

    root, truth = phantom
    cases = load_cases(root, split="official")
    assert all(c.split == split[c.id] for c in cases if not c.healthy)
    assert {c.split for c in cases if c.healthy} <= {"train", "val", "test"}
    assert len(cases) == len(truth) and not cases.unlisted


def test_packaged_reports_serve_real_ids(tmp_path, phantom):
    src, _ = phantom
    _copy_case(src, tmp_path, "BraTS20_Training_001", "BraTS20_Training_200", report=False)
    case = load_cases(tmp_path, reports="textbrats", split=None)[0]
    real = json.loads(packaged_file("reports.json").read_text())["BraTS20_Training_200"]
    assert case.report == " ".join(real.split()) and case.side == report_side(real)


@pytest.mark.parametrize("text, side", [
    ("The lesion area is in the right frontal lobe with high signal. Edema is in the right lobe.", "right"),
    ("The lesion area is in the left temporal lobe. Necrosis is in the right parietal lobe.", "left"),
    ("The lesion area is in the bilateral frontal lobes. Edema is around the left lobe.", "bilateral"),
    ("The lesion area is in the left frontal lobe and the right parietal lobe.", "bilateral"),
    ("The lesion area is in the white matter of both cerebral hemispheres.", "bilateral"),
    ("The lesion area is in the parietal lobe. Edema is seen in the right parietal region.", "right"),
    ("The lesion area is in the brain with mixed signals.", "unknown"),
    ("No focal lesion is seen. The ventricles are normal.", "none"),
    ("The outright abnormal bright area sits leftward of the midline.", "unknown"),
])
def test_side_rule(text, side):
    assert report_side(text) == side


def test_healthy_templates_name_no_side_and_the_choice_is_stable():
    assert {report_side(t) for t in HEALTHY_TEMPLATES} == {"none"}
    ids = [f"sub-{k:04d}" for k in range(1, 60)]
    chosen = [healthy_report(i) for i in ids]
    assert len(set(chosen)) == len(HEALTHY_TEMPLATES)  # every template is used
    # The choice is a function of the id's SHA-256 alone, so it is the same in every process and PYTHONHASHSEED.
    expected = [HEALTHY_TEMPLATES[int(hashlib.sha256(i.encode()).hexdigest()[:16], 16) % len(HEALTHY_TEMPLATES)]
                for i in ids]
    assert chosen == expected


# --- splits ----------------------------------------------------------------------------------------------------------

def test_side_stratified_split_is_seeded_and_round_trips(phantom, tmp_path):
    root, _ = phantom
    cases = load_cases(root, seed=7)
    by_side = Counter((c.side, c.split) for c in cases)
    for side in ("left", "right"):
        assert all(by_side[(side, s)] >= 1 for s in ("train", "val", "test")), by_side
        total = sum(by_side[(side, s)] for s in ("train", "val", "test"))
        assert abs(by_side[(side, "train")] - 0.7 * total) <= 1
    assert [c.split for c in load_cases(root, seed=7)] == [c.split for c in cases]
    assert [c.split for c in load_cases(root, seed=8)] != [c.split for c in cases]

    path = save_split(cases, tmp_path / "split.csv")
    frame = load_split_csv(path)
    assert list(frame["id"]) == cases.ids and list(frame["split"]) == [c.split for c in cases]
    again = load_cases(root, split=path)
    assert [(c.id, c.split) for c in again] == [(c.id, c.split) for c in cases]


def test_data_cli_writes_the_split(phantom, tmp_path, capsys):
    root, _ = phantom
    assert data.main(["--data-root", str(root), "--write-split", str(tmp_path / "split.csv"), "--split-seed", "3"]) == 0
    assert list(load_split_csv(tmp_path / "split.csv")["split"]) == [c.split for c in load_cases(root, seed=3)]
    assert "train:" in capsys.readouterr().out


# --- preprocessing ---------------------------------------------------------------------------------------------------

def _brighter_half(image: torch.Tensor) -> str:
    """Half of the H axis with more saturated voxels (tumour and edema reach the p99 clip)."""
    saturated = image[0] >= 0.95
    half = saturated.shape[1] // 2
    return "right" if saturated[:, half:].sum() > saturated[:, :half].sum() else "left"


def test_preprocessed_volumes_put_the_lesion_on_its_side_of_H(phantom):
    root, truth = phantom
    cases = [c for c in load_cases(root, split=None) if c.side in ("left", "right")]
    dataset = make_dataset(cases, VOLUME)
    hits = 0
    for k, case in enumerate(cases):
        item = dataset[k]
        assert item["image"].shape == (1, *VOLUME) and item["image"].dtype == torch.float32
        assert type(item["image"]) is torch.Tensor and item["image"].min() == 0 and 0.9 < item["image"].max() <= 1
        assert item["id"] == case.id and item["report"] == case.report and item["side"] == case.side
        hits += _brighter_half(item["image"]) == case.side
    assert {truth[c.id]["stored_orientation"] for c in cases} == {"LPS", "RAS"}
    assert hits / len(cases) >= 0.85  # chance is 0.5; a volume read without its header would sit there


@pytest.mark.parametrize("text, mirrored", [
    ("A mass in the left frontal lobe, right-sided shift.", "A mass in the right frontal lobe, left-sided shift."),
    ("Left temporal edema; midline shift rightward. RIGHT", "Right temporal edema; midline shift leftward. LEFT"),
    ("Bilateral lesions; a bright rim, upright, rightly read.",) * 2,
])
def test_mirror_report_swaps_the_side_words_only(text, mirrored):
    assert mirror_report(text) == mirrored
    assert mirror_report(mirrored) == text


def test_mirrored_volumes_and_reports_agree_on_the_side(phantom):
    root, _ = phantom
    cases = [c for c in load_cases(root, split=None) if c.side in ("left", "right")]
    volumes = torch.stack([item["image"] for item in make_dataset(cases, VOLUME)])
    mirrored = mirror_volumes(volumes)
    assert torch.equal(mirror_volumes(mirrored), volumes)  # a mirror of the mirror is the scan
    hits = 0
    for k, case in enumerate(cases):
        side = report_side(mirror_report(case.report))
        assert side == {"left": "right", "right": "left"}[case.side]
        hits += _brighter_half(mirrored[k]) == side
    assert hits / len(cases) >= 0.85  # the mirrored lesion lies on the side its mirrored report names


def test_left_right_mirror_takes_the_mirrored_fields_of_the_drawn_cases():
    volumes = torch.rand(4, 1, 2, 6, 3)
    batch = {"volume": volumes, "mirrored_volume": mirror_volumes(volumes),
             "target": torch.arange(4)[:, None].repeat(1, 5), "mirrored_target": -torch.arange(4)[:, None].repeat(1, 5),
             "key": torch.arange(4)}
    out = LeftRightMirror(["volume", "target"])(batch, torch.tensor([[0.1], [0.7], [0.49], [0.5]]))
    assert set(out) == {"volume", "target", "key"}
    for k, flip in enumerate([True, False, True, False]):
        assert torch.equal(out["volume"][k], volumes[k].flip(-2) if flip else volumes[k])
        assert torch.equal(out["target"][k], batch["mirrored_target" if flip else "target"][k])
    assert torch.equal(out["key"], batch["key"])  # a field not named is kept as written


def test_mirrored_pairs_follow_each_case_with_its_mirror_image():
    volumes = torch.rand(3, 1, 2, 6, 3)
    batch = {"volume": volumes, "mirrored_volume": mirror_volumes(volumes),
             "key": torch.tensor([5, 6, 7]), "mirrored_key": torch.tensor([-5, -6, -7]), "weight": torch.ones(3)}
    out = MirroredPairs()(batch, torch.rand(3, 1))
    assert set(out) == {"volume", "key", "weight"}
    assert out["key"].tolist() == [5, 6, 7, -5, -6, -7]
    for k in range(3):
        assert torch.equal(out["volume"][3 + k], volumes[k].flip(-2)) and torch.equal(out["volume"][k], volumes[k])
    assert out["weight"].tolist() == [1.0] * 6  # a field with no mirrored counterpart is repeated, rows stay aligned


def test_ras_and_lps_files_of_one_volume_preprocess_alike(phantom, tmp_path):
    root, _ = phantom
    volume = np.asarray(nib.as_closest_canonical(nib.load(_flair(root, "BraTS20_Training_001"))).dataobj) / 1000
    paths = []
    for lps in (False, True):
        paths.append(tmp_path / f"{'lps' if lps else 'ras'}.nii.gz")
        paths[-1].write_bytes(nifti_bytes(volume, lps=lps))
    assert nib.aff2axcodes(nib.load(paths[1]).affine) == ("L", "P", "S")
    ras, lps = (load_volume(p, VOLUME) for p in paths)
    assert torch.allclose(ras, lps, atol=1e-5)
    assert not torch.allclose(ras, ras.flip(2), atol=0.05)  # the volume is not left-right symmetric


def test_real_brats2023_case_preprocesses_to_size_in_ras(shared_data):
    flair = shared_data / "brats" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2f.nii.gz"
    if not flair.is_file():
        pytest.skip("the BraTS 2023 case is absent")
    cases = load_cases(flair.parent.parent, split=None, require_reports=False)
    assert cases.ids == ["BraTS-GLI-00001-000"] and cases[0].flair == flair and cases[0].side == "unknown"
    image = make_dataset(cases, data.DEFAULT_VOLUME_SIZE)[0]["image"]
    assert image.shape == (1, 64, 128, 128) and image.dtype == torch.float32

    def reference(array: np.ndarray) -> torch.Tensor:
        """(X, Y, Z) -> (D, H, W), p1-p99 to [0, 1], trilinear resize: the pipeline without MONAI."""
        low, high = np.percentile(array, [1, 99])
        scaled = torch.from_numpy(np.clip((array - low) / (high - low), 0, 1).transpose(2, 0, 1).copy()).float()
        return torch.nn.functional.interpolate(scaled[None, None], size=(64, 128, 128), mode="trilinear")[0]

    raw = nib.load(flair)
    assert nib.aff2axcodes(raw.affine) != ("R", "A", "S")  # stored LPS: reorientation has work to do
    canonical = reference(np.asarray(nib.as_closest_canonical(raw).dataobj, dtype=np.float32))
    unoriented = reference(np.asarray(raw.dataobj, dtype=np.float32))
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])  # noqa: E731
    assert corr(image, canonical) > 0.95 and corr(image, canonical) > corr(image, unoriented) + 0.2


def test_second_epoch_reads_no_nifti(phantom, tmp_path, monkeypatch):
    root, _ = phantom
    cases = load_cases(root, split=None).cases[:5]
    loads = Counter()
    real_load = nib.load

    def counting_load(path, *args, **kwargs):
        loads[Path(path).name] += 1
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    dataset = make_dataset(cases, VOLUME, cache_dir=tmp_path / "cache")
    first = [dataset[k]["image"] for k in range(len(dataset))]
    assert sum(loads.values()) == len(cases)
    loads.clear()
    second = [dataset[k]["image"] for k in range(len(dataset))]
    assert sum(loads.values()) == 0 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert len(list(dataset.cache_dir.glob("*.pt"))) == len(cases)

    bigger = make_dataset(cases, (16, 24, 32), cache_dir=tmp_path / "cache")
    assert bigger.cache_dir != dataset.cache_dir
    assert bigger[0]["image"].shape == (1, 16, 24, 32) and sum(loads.values()) == 1


def test_volume_size_must_divide_by_the_patch():
    assert check_volume_size((64, 126, 126), (2, 14, 14)) == (32, 9, 9)
    with pytest.raises(ConfigError) as info:
        check_volume_size((64, 128, 128), (2, 14, 14))
    assert info.value.source == "--volume-size" and "126" in info.value.message


# --- bad inputs ------------------------------------------------------------------------------------------------------

def _rewrite_header(path: Path, **fields) -> None:
    image = nib.load(path)
    header = image.header.copy()
    for key, value in fields.items():
        header[key] = value
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header=header), path)


def _no_flair(root: Path) -> Path:
    _flair(root, "BraTS20_Training_002").unlink()
    return root / "BraTS20_Training_002"


def _truncated(root: Path) -> Path:
    path = _flair(root, "BraTS20_Training_002")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _not_3d(root: Path) -> Path:
    path = _flair(root, "BraTS20_Training_002")
    volume = np.asarray(nib.load(path).dataobj)
    nib.save(nib.Nifti1Image(np.stack([volume, volume], -1), nib.load(path).affine), path)
    return path


def _zero_affine(root: Path) -> Path:
    path = _flair(root, "BraTS20_Training_002")
    _rewrite_header(path, srow_x=0, srow_y=0, srow_z=0, qform_code=0, sform_code=1)
    return path


def _nan_affine(root: Path) -> Path:
    path = _flair(root, "BraTS20_Training_002")
    _rewrite_header(path, srow_x=[np.nan, 0, 0, 0], qform_code=0, sform_code=1)
    return path


def _empty_report(root: Path) -> Path:
    path = root / "BraTS20_Training_002" / "BraTS20_Training_002_flair_text.txt"
    path.write_text("  \n")
    return path


def _no_report(root: Path) -> Path:
    path = root / "BraTS20_Training_002" / "BraTS20_Training_002_flair_text.txt"
    path.unlink()
    return path


def _no_healthy_volumes(root: Path) -> Path:
    for path in (root / "healthy").iterdir():
        path.unlink()
    return root / "healthy"


BAD_INPUTS = {"no FLAIR": (_no_flair, "no FLAIR"), "truncated": (_truncated, "truncated"),
              "not 3-D": (_not_3d, "4-D"), "zero affine": (_zero_affine, "zero or singular"),
              "non-finite affine": (_nan_affine, "non-finite"), "empty report": (_empty_report, "empty report"),
              "case without report": (_no_report, "no report for case BraTS20_Training_002"),
              "healthy folder without volumes": (_no_healthy_volumes, "no healthy volumes")}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_file_or_is_skipped(name, phantom, tmp_path, capsys):
    root = _small_tree(phantom, tmp_path)
    healthy_before = len([c for c in load_cases(root, split=None) if c.healthy])
    make_bad, words = BAD_INPUTS[name]
    culprit = make_bad(root)
    with pytest.raises(DataError) as info:
        load_cases(root)
    assert Path(info.value.source) == culprit and words in info.value.message
    assert "\n" not in str(info.value)

    assert data.main(["--data-root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {culprit}:") and words in err[0]

    cases = load_cases(root, skip_bad=True)
    assert [Path(p) for p, _ in cases.skipped] == [culprit]
    lost_healthy = name == "healthy folder without volumes"
    assert len(cases) == 5 - (healthy_before if lost_healthy else 1)
    assert "BraTS20_Training_002" not in cases.ids or lost_healthy
    assert data.main(["--data-root", str(root), "--skip-bad"]) == 0
    assert "skipped: 1" in capsys.readouterr().out


def test_only_cases_in_the_split_need_a_report(phantom, tmp_path):
    root = _small_tree(phantom, tmp_path)
    _copy_case(phantom[0], root, "BraTS20_Training_004", "BraTS20_Training_999", report=False)
    cases = load_cases(root, split="official")  # 999 is not a TextBraTS case: left out, no report needed
    assert cases.unlisted == ["BraTS20_Training_999"] and "BraTS20_Training_999" not in cases.ids
    with pytest.raises(DataError, match="no report for case BraTS20_Training_999"):
        load_cases(root)


def test_a_gzip_whose_trailer_disagrees_is_decompressed_to_check(phantom, tmp_path):
    src = _flair(phantom[0], "BraTS20_Training_001")
    good = tmp_path / "two_members.nii.gz"
    raw = gzip.decompress(src.read_bytes())
    good.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))  # valid, but the trailer is partial
    assert data.check_nifti(good) == SIZE


@pytest.mark.parametrize("argv, flag", [
    (["--volume-size", "0", "128", "128"], "--volume-size"),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"], "--val-fraction"),
    (["--split", "missing.csv"], "missing.csv"),
])
def test_bad_flags_exit_2(phantom, capsys, argv, flag):
    root, _ = phantom
    assert data.main(["--data-root", str(root), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:")
