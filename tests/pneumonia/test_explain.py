"""Grad-CAM: on a toy network whose logit reads one region the map lies in that region; on the phantom run the
cases shown are the ones the threshold puts in each group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from pneumonia import explain

H, W = 16, 24  # not square, so a swapped height and width would show


class RegionFeatures(nn.Module):
    """Channel 0 sees only the top-right quadrant, channel 1 only the bottom-left; pooled to half resolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.dirac_(self.conv.weight)
        masks = torch.zeros(1, 2, H, W)
        masks[0, 0, : H // 2, W // 2 :] = 1
        masks[0, 1, H // 2 :, : W // 2] = 1
        self.register_buffer("masks", masks)

    def forward(self, x):
        return nn.functional.avg_pool2d(torch.relu(self.conv(x)) * self.masks, 2)


class TopRightNet(nn.Module):
    """Its logit is the mean activation of the top-right channel; the bottom-left one never reaches it."""

    def __init__(self):
        super().__init__()
        self.features = RegionFeatures()

    @property
    def target_layer(self):
        return self.features

    def forward(self, x):
        return self.features(x)[:, 0].mean(dim=(1, 2))


def _two_squares(n=3):
    """Equally bright squares in the top-right and bottom-left quadrants, at a different place per image."""
    images = torch.zeros(n, 1, H, W)
    for i in range(n):
        images[i, 0, 1 + i : 5 + i, 14 + 2 * i : 18 + 2 * i] = 1.0
        images[i, 0, 10 + i : 14 + i, 2 + 2 * i : 6 + 2 * i] = 1.0
    return images


def test_gradcam_peaks_in_the_region_the_logit_reads():
    model = TopRightNet()
    images = _two_squares()
    maps = explain.gradcam_maps(model, images, model.target_layer, classes=[1, 1, 1])
    assert maps.shape == (3, H, W)
    for i, heat in enumerate(maps):
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        assert row < H // 2 and col >= W // 2, (i, row, col)
        top_right = heat[: H // 2, W // 2 :].sum()
        assert top_right / heat.sum() > 0.9
        # The bright square the logit cannot see gets nothing, although it is as bright.
        assert heat[10 + i : 14 + i, 2 + 2 * i : 6 + 2 * i].max() < 0.05
        # The peak sits on this image's own square, so the map follows the content, not a fixed place.
        square = np.zeros((H, W), bool)
        square[1 + i - 1 : 5 + i + 1, 14 + 2 * i - 1 : 18 + 2 * i + 1] = True
        assert square[row, col]


def test_select_cases_groups_by_threshold_and_confidence():
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.6, 0.7, 0.2, 0.1, 0.95, 0.3, 0.8])
    cases = explain.select_cases(labels, scores, threshold=0.5, n=2)
    assert cases["tp"].tolist() == [0, 7]  # most confident first
    assert cases["fp"].tolist() == [5, 2]
    assert cases["fn"].tolist() == [4, 6]  # lowest P(pneumonia) first


def test_explain_cli_on_phantom_run(trained_pneumonia_run, capsys):
    run_dir, npz = trained_pneumonia_run
    assert explain.main(["--run-dir", str(run_dir), "--data-root", str(npz.parent), "--n", "3"]) == 0
    cases = pd.read_csv(run_dir / "figures" / "gradcam_cases.csv")
    assert len(cases) and set(cases["group"]) <= {"tp", "fp", "fn"}
    threshold = cases["threshold"].iloc[0]
    predicted_pneumonia = cases["prob_pneumonia"] >= threshold
    expected = {"tp": ("pneumonia", True), "fp": ("normal", True), "fn": ("pneumonia", False)}
    for _, row in cases.iterrows():
        label, positive = expected[row["group"]]
        assert row["label"] == label and (row["prob_pneumonia"] >= threshold) == positive
        assert row["explained_class"] == ("pneumonia" if positive else "normal")
        assert 0 <= row["cam_peak_row"] < 28 and 0 <= row["cam_peak_col"] < 28
    assert predicted_pneumonia.sum() == cases["group"].isin(["tp", "fp"]).sum()
    for group in set(cases["group"]):
        assert (run_dir / "figures" / f"gradcam_{group}.png").stat().st_size > 5000
    assert (cases["group"] == "tp").sum() == 3  # the phantom run finds pneumonia: three true positives to show
    section = explain.run_section(run_dir, run_dir)
    assert "## Pneumonia: Grad-CAM" in section and "](figures/gradcam_tp.png)" in section


def test_missing_model_exits_2(tmp_path, capsys):
    assert explain.main(["--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no trained model" in err
