"""The histology_phantom phantom: BraTS-Path layout, captions for every tile, and image and caption that complement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import matthews_corrcoef
from sklearn.model_selection import cross_val_predict
from sklearn.preprocessing import StandardScaler

from common.phantoms import __main__ as phantoms
from common.phantoms.histology import SCHEMA_CLASSES, WRONG_CAPTION
from pathology_brats.data import load_tiles, unlabeled_images
from pathology_brats.schema import SCHEMAS, get_schema
from tests.conftest import HISTOLOGY_TILES_PER_CLASS


def test_the_phantom_knows_the_schemas_the_pipeline_uses():
    assert SCHEMA_CLASSES == {year: schema.classes for year, schema in SCHEMAS.items()}


def test_layout_parses_and_every_tile_has_a_caption(histology_phantom):
    schema = get_schema("2025")
    from_folders = load_tiles(histology_phantom, schema)
    from_csv = load_tiles(histology_phantom, schema, histology_phantom / "labels.csv")
    assert sorted(from_csv.paths) == sorted(from_folders.paths)
    assert set(from_csv.counts().values()) == {HISTOLOGY_TILES_PER_CLASS}
    captions = [json.loads(line) for line in (histology_phantom / "captions.jsonl").read_text().splitlines()]
    names = [c["image"] for c in captions]
    val = unlabeled_images(histology_phantom / "val")
    assert sorted(names) == sorted([p.name for p in from_csv.paths] + [p.name for p in val])
    assert all(Image.open(p).mode == "RGB" for p in from_csv.paths[:5])
    truth = pd.read_csv(histology_phantom / "phantom_truth.csv")
    wrong = 1 - truth["caption_correct"].mean()  # within 3 binomial standard errors of the design's share
    assert abs(wrong - WRONG_CAPTION) < 3 * math.sqrt(WRONG_CAPTION * (1 - WRONG_CAPTION) / len(truth))
    assert not any(code in c["caption"].split() for c in captions for code in schema.classes)  # no class codes


def _image_features(path: Path) -> list[float]:
    """Colour, dark-object count and size, grey histogram and edge energy: a fixed, untrained description."""
    pixels = np.asarray(Image.open(path).convert("RGB").resize((64, 64)), dtype=np.float32) / 255
    grey = pixels.mean(2)
    objects, count = ndimage.label(grey < 0.5)
    sizes = np.bincount(objects.ravel())[1:] if count else np.zeros(1)
    return [*pixels.mean((0, 1)), *pixels.std((0, 1)), (grey < 0.5).mean(), count, sizes.mean(),
            np.percentile(sizes, 90), *np.histogram(grey, bins=16, range=(0, 1))[0] / grey.size,
            np.abs(ndimage.sobel(grey, 0)).mean(), np.abs(ndimage.sobel(grey, 1)).mean(), (grey > 0.9).mean()]


def test_image_and_caption_complement_each_other(histology_phantom):
    """Logistic regressions on fixed features (5-fold): the fused one beats each modality alone by a margin."""
    labels = pd.read_csv(histology_phantom / "labels.csv")
    captions = {json.loads(line)["image"]: json.loads(line)["caption"]
                for line in (histology_phantom / "captions.jsonl").read_text().splitlines()}
    y = labels["Ground-Truth"].to_numpy()
    image = np.array([_image_features(histology_phantom / p) for p in labels["Input Path"]])
    image = StandardScaler().fit_transform(image)
    text = CountVectorizer().fit_transform([captions[Path(p).name] for p in labels["Input Path"]]).toarray()
    scores = {}
    for name, features in (("image", image), ("text", text), ("fused", np.hstack([image, text]))):
        predicted = cross_val_predict(LogisticRegression(max_iter=3000), features, y, cv=5)
        scores[name] = matthews_corrcoef(y, predicted)
    assert scores["fused"] > max(scores["image"], scores["text"]) + 0.05, scores
    assert scores["text"] < 0.85 and scores["image"] < 0.9, scores  # neither modality alone solves it


def test_histology_cli_and_bad_size(tmp_path, capsys):
    assert phantoms.main(["histology", "--out", str(tmp_path / "h"), "--n", "2", "--size", "64",
                          "--schema", "2026"]) == 0
    assert sorted(p.name for p in (tmp_path / "h").iterdir() if p.is_dir()) == sorted([*SCHEMA_CLASSES["2026"], "val"])
    assert phantoms.main(["histology", "--out", str(tmp_path / "x"), "--size", "16"]) == 2
    assert capsys.readouterr().err.startswith("error: --size")
