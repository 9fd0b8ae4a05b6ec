import matplotlib
import numpy as np
import pytest
from PIL import Image

from common import plots


@pytest.fixture
def drawn(monkeypatch):
    """What each figure holds when it is saved: per axes, its lines, texts, legend entries and images."""
    seen = []
    original = plots._save

    def capture(fig, path):
        axes = []
        for ax in fig.axes:
            legend = ax.get_legend()
            axes.append({"lines": {line.get_label(): (np.asarray(line.get_xdata(), float),
                                                      np.asarray(line.get_ydata(), float)) for line in ax.lines},
                         "texts": [t.get_text() for t in ax.texts], "title": ax.get_title(),
                         "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                         "images": [np.asarray(im.get_array()) for im in ax.images]})
        seen.append(axes)
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return seen


def _assert_png(path, expected):
    assert path == expected
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 100 and image.height > 100
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_loss_curves(tmp_path, drawn):
    history = [
        {"epoch": 1, "step": 10, "train_loss": 0.9, "lr": 1e-3, "val_loss": 0.8, "val_auroc": 0.7, "is_best": True},
        {"epoch": 2, "step": 20, "train_loss": 0.6, "lr": 5e-4},
        {"epoch": 3, "step": 30, "train_loss": 0.4, "val_loss": 0.5, "val_auroc": 0.85, "val_note": "text"},
    ]
    _assert_png(plots.loss_curves(history, tmp_path / "figures" / "loss.png"), tmp_path / "figures" / "loss.png")
    losses, metrics = drawn[0]
    assert set(losses["lines"]) == {"train_loss", "val_loss"} and set(metrics["lines"]) == {"val_auroc"}
    np.testing.assert_array_equal(losses["lines"]["train_loss"][1], [0.9, 0.6, 0.4])
    np.testing.assert_array_equal(losses["lines"]["val_loss"][0], [1, 3])  # epochs without validation are skipped
    np.testing.assert_array_equal(metrics["lines"]["val_auroc"][1], [0.7, 0.85])


def test_roc_curve_and_single_class(tmp_path, drawn):
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    s = 0.5 * y + rng.random(100)
    _assert_png(plots.roc_curve(y, s, tmp_path / "roc.png"), tmp_path / "roc.png")
    _assert_png(plots.roc_curve(np.ones(10), s[:10], tmp_path / "roc1.png"), tmp_path / "roc1.png")
    (roc,), (one_class,) = drawn
    label = f"AUROC = {skm.roc_auc_score(y, s):.3f}"
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert roc["legend"] == ["chance", label]
    np.testing.assert_array_equal(roc["lines"][label][0], fpr)
    np.testing.assert_array_equal(roc["lines"][label][1], tpr)
    assert list(one_class["lines"]) == ["chance"] and "undefined" in one_class["title"]


def test_confusion_matrix_indices_and_strings(tmp_path, drawn):
    y = np.array([0, 1, 1, 2, 2, 2])
    p = np.array([0, 1, 2, 2, 2, 0])
    names = ["normal", "bacterial", "viral"]
    _assert_png(plots.confusion_matrix(y, p, names, tmp_path / "cm.png"), tmp_path / "cm.png")
    words = np.array(names)
    _assert_png(plots.confusion_matrix(words[y], words[p], names, tmp_path / "cm2.png"), tmp_path / "cm2.png")
    expected = [[1, 0, 0], [0, 1, 1], [1, 0, 2]]  # rows: truth
    for axes in drawn:
        np.testing.assert_array_equal(axes[0]["images"][0], expected)
        assert axes[0]["texts"] == [str(v) for row in expected for v in row]


def test_gallery_and_panels(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.random((28, 28)) for _ in range(6)] + [(rng.random((28, 28, 3)) * 255).astype(np.uint8)]
    path = plots.image_gallery(images, [f"#{i}" for i in range(7)], tmp_path / "gallery.png", ncols=4)
    _assert_png(path, tmp_path / "gallery.png")
    image = rng.random((32, 32))
    mask = image > 0.7
    rows = [[image, plots.mask_overlay(image, mask), plots.heatmap_overlay(image, image)], [image]]
    path = plots.overlay_panels(rows, [["image", "mask", "saliency"], ["only"]], tmp_path / "panels.png")
    _assert_png(path, tmp_path / "panels.png")
    with pytest.raises(ValueError, match="same nested shape"):
        plots.overlay_panels(rows, [["image"], ["only"]], tmp_path / "bad.png")


def test_mask_overlay_values():
    image = np.full((4, 4), 0.5, dtype=np.float32)
    mask = np.zeros((4, 4), np.bool_)
    mask[1, 2] = True
    out = plots.mask_overlay(image, mask, color=(1, 0, 0), alpha=0.4)
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[1, 2], [0.6 * 0.5 + 0.4, 0.3, 0.3], atol=1e-6)
    np.testing.assert_allclose(out[0, 0], [0.5, 0.5, 0.5], atol=1e-6)
    uint8 = plots.mask_overlay(np.full((4, 4), 255, dtype=np.uint8), mask, color=(0, 0, 1), alpha=0.5)
    np.testing.assert_allclose(uint8[1, 2], [0.5, 0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="mask shape"):
        plots.mask_overlay(image, mask[:2])


def test_heatmap_overlay_values():
    image = np.full((3, 3), 0.2, dtype=np.float32)
    heat = np.zeros((3, 3))
    heat[0, 0] = 4.0  # any scale: min-max scaled to [0, 1]
    out = plots.heatmap_overlay(image, heat, alpha=0.5)
    jet = matplotlib.colormaps["jet"]
    np.testing.assert_allclose(out[0, 0], 0.5 * 0.2 + 0.5 * np.array(jet(1.0)[:3]), atol=1e-6)
    np.testing.assert_allclose(out[2, 2], 0.5 * 0.2 + 0.5 * np.array(jet(0.0)[:3]), atol=1e-6)
