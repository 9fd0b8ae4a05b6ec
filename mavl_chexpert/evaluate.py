"""Evaluate a phase-1 (image) or phase-3 (fusion) run: predictions CSV first, then per-disease and overall tables.

Example:
    python -m mavl_chexpert.evaluate --run-dir runs/mavl/fusion --split test
    python -m mavl_chexpert.evaluate --run-dir runs/mavl/fusion --test-csv /data/chexpert/test_labels.csv
    python -m mavl_chexpert.evaluate --run-dir runs/mavl/fusion --unit image

Units: ``study`` (default, CheXpert's protocol) scores each study by the maximum probability over its views and
bootstraps studies; ``image`` scores every image on its own. A study is the ``Study`` column when the CSV has one,
else the path's ``patientN/studyM`` folder; a study whose rows name two patients is refused. The official test
labels (500 studies, ``Path`` ``test/patientN/studyM/viewK_frontal.jpg``, 0/1 labels, no view columns) are read as
they are: a path's ``frontal`` decides the view when there is no ``Frontal/Lateral`` column.

``test`` is ``valid.csv`` of the run's data root (or ``--test-csv``); ``val`` is the run's own validation patients.
The per-class thresholds are the ones chosen on validation during training (``best/model.json``).
``--oracle-thresholds`` re-tunes them on the evaluated set itself, as the seed (and several zero-shot papers) did;
those numbers are optimistic by construction, go to ``oracle/`` and are labelled ORACLE.

Diseases held out of every phase (``--holdout-classes``) are kept out of the macro averages and reported under
``unseen`` in ``results.json`` (``unseen/<class>/auroc`` with its CI) with the control ``auroc_swapped``: the same
model with the disease's description embeddings replaced by those of the seen disease whose descriptions state
fewest of its sentences, then are least similar (``swapped_with``; every other seen disease in
``auroc_swapped_each``). A score that comes from the
descriptions falls towards 0.5 under the swap; one that comes from anything else would not.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import plots
from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.metrics.classification import binary_metrics
from common.run_guard import guard_command
from common.rundir import atomic_write_json, atomic_write_text, recover_results, result_set
from common.runs import load_run
from common.splits import load_split_csv
from common.tables import ci_cell, json_safe, markdown_table, metrics_with_ci, write_results
from mavl_chexpert.data import Preprocessing, Table, find_root, label_key, load_table
from mavl_chexpert.model import build_fusion_model, build_image_model, same_sentences
from mavl_chexpert.shared import (
    add_data_root_arg,
    add_n_boot_arg,
    add_skip_bad_arg,
    check_holdout_positives,
    choose_thresholds,
    split_metrics,
)

log = logging.getLogger("medvl.mavl_chexpert")

SPLITS = ("test", "val")
UNITS = ("study", "image")
OVERALL = ("auroc_macro", "auroc_micro", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "hamming_loss",
           "acc_subset")
PER_CLASS = ("auroc", "auprc", "f1", "precision", "recall", "specificity")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(seed=True, device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a train_image or train_fusion run")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="split scored (the test split is read once per finished run)")
    add_data_root_arg(parser, help="defaults to the data the run was trained on")
    parser.add_argument("--test-csv", type=Path, default=None,
                        help="CSV with Path + label columns, such as CheXpert's official 500-study test labels "
                             "(Path test/patientN/studyM/viewK_frontal.jpg, 0/1 labels; an optional Study column); "
                             "default valid.csv")
    parser.add_argument("--unit", choices=UNITS, default="study",
                        help="study: score each study by the maximum probability over its views (CheXpert's "
                             "protocol); image: every image on its own")
    parser.add_argument("--oracle-thresholds", action="store_true",
                        help="tune thresholds on the evaluated set (optimistic; written to oracle/, labelled)")
    add_n_boot_arg(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per inference batch")
    add_skip_bad_arg(parser)
    return parser


STAGES = ("image", "fusion")


def _build(meta: dict) -> torch.nn.Module:
    """The run's model; a ``stage`` other than the two this package trains is refused (``load_run`` names the file)."""
    if meta["stage"] not in STAGES:
        raise ValueError(f"stage {meta['stage']!r} is not one of {', '.join(STAGES)}")
    if meta["stage"] == "fusion":
        return build_fusion_model(meta["kwargs"])
    return build_image_model(**meta["kwargs"])


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64,
                  temperature: float = 1.0, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """(N, C) probabilities of uint8 (N, H, W) images, normalised as the run recorded (``preprocessing``)."""
    if preprocessing is None:
        preprocessing = Preprocessing(int(images.shape[-1]))
    dataset = preprocessing.dataset(images)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    logits = torch.cat([model(batch["image"].to(device)).float().cpu() for batch in loader])
    return torch.sigmoid(logits / temperature).numpy()


def evaluation_table(run_dir: Path, meta: dict, split: str, data_root: Path | None, test_csv: Path | None) -> Table:
    settings = meta["data"]
    root = find_root(data_root or Path(settings["root"]))
    labels = tuple(meta["labels"])
    if split == "test":
        table = load_table(root, test_csv or "valid.csv", labels, settings["uncertain"], settings["views"])
        check_unseen(table, run_dir / "split.csv")
        return table
    table = load_table(root, "train.csv", labels, settings["uncertain"], settings["views"])
    split_frame = load_split_csv(run_dir / "split.csv")
    val = set(split_frame.loc[split_frame["split"] == "val", "id"])
    keep = np.flatnonzero([p in val for p in table.rel_paths])
    if not len(keep):
        raise DataError(run_dir / "split.csv", f"no validation image of it is in {table.csv}")
    return table.take(keep)


def check_unseen(table: Table, split_csv: Path) -> None:
    """A test image of a patient the run trained or selected on is refused, naming the line: its scores would be
    those of a model that has seen that patient (the test set must hold other patients)."""
    if not split_csv.is_file():
        return
    seen = load_split_csv(split_csv)
    by_patient = dict(zip(seen["group"], seen["split"]))
    for patient, line in zip(table.patients, table.rows):
        if patient in by_patient:
            raise DataError(table.csv, f"line {line}: patient {patient} is in the run's {by_patient[patient]} split "
                                       f"({split_csv}); a test set must hold other patients")


def _metric_fn(labels: tuple[str, ...], thresholds: np.ndarray):
    keys = [label_key(n) for n in labels]

    def compute(arrays: dict[str, np.ndarray]) -> dict[str, float]:
        out = split_metrics(arrays["target"], arrays["prob"], arrays["mask"], labels, thresholds)
        for j, key in enumerate(keys):
            rows = arrays["mask"][:, j]
            per = binary_metrics(arrays["target"][rows, j], arrays["prob"][rows, j], thresholds[j])
            for name in PER_CLASS:
                out[f"{name}_{key}"] = per[name]
        return out

    return compute


def study_index(table: Table) -> tuple[pd.DataFrame, np.ndarray]:
    """(one row per study in first-seen order: study, patient, views; each image's row number in it)."""
    studies, first, inverse = np.unique(table.studies.astype(str), return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    unit = rank[inverse]
    frame = pd.DataFrame({"study": studies[order], "patient": table.patients[first[order]],
                          "views": np.bincount(unit, minlength=len(order))})
    return frame, unit


def study_max(unit: np.ndarray, count: int, values: np.ndarray) -> np.ndarray:
    """Per study, the maximum of ``values`` (N, ...) over its images."""
    out = np.full((count, *values.shape[1:]), -np.inf)
    np.maximum.at(out, unit, values.astype(np.float64))
    return out


def study_units(table: Table, probs: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """One row per study: (frame, targets, mask, probs), the probability being the maximum over the study's views
    (CheXpert's protocol) and a label positive when any view's is (views of a study share their labels)."""
    frame, unit = study_index(table)
    observed = table.mask.astype(np.float64)
    mask = study_max(unit, len(frame), observed) > 0
    targets = study_max(unit, len(frame), table.targets * observed)
    return frame, targets.astype(np.float32), mask, study_max(unit, len(frame), probs)


def least_similar(aspects: torch.Tensor, aspect_mask: torch.Tensor, target: int, candidates: list[int]) -> list[int]:
    """``candidates`` ordered from the least to the most similar description set to ``target``'s: first by how many
    of ``target``'s sentences they also state (the same text embeds alike), then by the cosine of their mean aspect
    embeddings. The first is the swap control's partner: a set that states none of the target's values, so a score
    that follows the descriptions has nothing of the target's left to find."""
    def unit_rows(c: int) -> torch.Tensor:
        return torch.nn.functional.normalize(aspects[c][aspect_mask[c]].float(), dim=-1)

    anchor = unit_rows(target)

    def key(c: int) -> tuple[int, float]:
        rows = unit_rows(c)
        in_common = int(same_sentences(anchor, rows).any(1).sum())
        return in_common, float(torch.nn.functional.cosine_similarity(anchor.mean(0), rows.mean(0), dim=0))

    return sorted(candidates, key=key)


@torch.no_grad()
def swapped_probs(model: torch.nn.Module, images: np.ndarray, device: torch.device, target: int, partner: int,
                  batch_size: int, temperature: float, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """Column ``target``'s probabilities when its description embeddings are replaced by ``partner``'s (the
    control: a score that comes from the descriptions must follow them)."""
    rows = [name for name in ("aspects", "aspect_mask", "aspect_shared") if hasattr(model, name)]
    saved = {name: getattr(model, name).clone() for name in rows}
    try:
        for name in rows:
            getattr(model, name)[target] = saved[name][partner]
        return predict_proba(model, images, device, batch_size, temperature, preprocessing)[:, target]
    finally:
        for name in rows:
            getattr(model, name).copy_(saved[name])


def _unseen_fn(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    rows = arrays["mask"]
    y = arrays["target"][rows].astype(int)
    return {"auroc": binary_metrics(y, arrays["prob"][rows])["auroc"],
            "auroc_swapped": binary_metrics(y, arrays["swapped"][rows])["auroc"]}


def evaluate_run(run_dir: Path, split: str = "test", data_root: Path | None = None, test_csv: Path | None = None,
                 oracle: bool = False, n_boot: int = 1000, device: str = "auto", seed: int = 0,
                 batch_size: int = 64, skip_bad: bool = False, unit: str = "study") -> dict:
    """Predict ``split`` with the run's best model and write predictions, tables and ROC figures as one result set.

    ``unit`` ``study`` scores each study by the maximum probability over its views (CheXpert's protocol); ``image``
    scores every image on its own. Diseases held out of every phase are reported apart (``unseen``), each with the
    AUROC of its own descriptions and of another disease's (the control).
    """
    if unit not in UNITS:
        raise ConfigError("--unit", f"choose one of {', '.join(UNITS)}, not {unit!r}")
    run_dir = Path(run_dir)
    recover_results(run_dir)
    torch_device = pick_device(device)
    run = load_run(run_dir, "mavl_chexpert", _build, device=torch_device)
    meta = run.meta
    labels = tuple(meta["labels"])
    keys = [label_key(n) for n in labels]
    holdout = [n for n in (meta.get("holdout_classes") or []) if n in labels]
    trained = np.array([n not in holdout for n in labels])
    table = evaluation_table(run_dir, meta, split, data_root, test_csv)
    check_holdout_positives(table, trained, "the run's holdout_classes")
    preprocessing = Preprocessing.from_record(meta["preprocessing"])
    images, kept = preprocessing.decode(table, skip_bad)
    table = table.take(kept)
    temperature = 0.2 if meta.get("loss") == "contrastive" else 1.0
    probs = predict_proba(run.model, images, torch_device, batch_size, temperature, preprocessing)
    swaps: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name in holdout:
        c = labels.index(name)
        order = least_similar(run.model.aspects, run.model.aspect_mask, c, list(np.flatnonzero(trained)))
        swaps[name] = [(labels[p], swapped_probs(run.model, images, torch_device, c, p, batch_size, temperature,
                                                 preprocessing)) for p in order]
    if unit == "study":
        frame, targets, mask, probs_unit = study_units(table, probs)
        _, index = study_index(table)
        swaps = {n: [(p, study_max(index, len(frame), v)) for p, v in pairs] for n, pairs in swaps.items()}
    else:
        frame = pd.DataFrame({"path": table.rel_paths, "study": table.studies, "patient": table.patients})
        targets, mask, probs_unit = table.targets, table.mask, probs
    seen_labels = tuple(n for n in labels if n not in holdout)
    seen_keys = [label_key(n) for n in seen_labels]
    if oracle:
        chosen = choose_thresholds(targets[:, trained], probs_unit[:, trained], mask[:, trained], seen_labels,
                                   meta.get("threshold_rule", "f1"))
    else:
        chosen = meta["thresholds"]
    thresholds = np.array([float(chosen.get(k, 0.5)) for k in keys])
    metric_keys = list(OVERALL) + [f"{m}_{k}" for k in seen_keys for m in PER_CLASS]
    results = metrics_with_ci(_metric_fn(seen_labels, thresholds[trained]),
                              {"target": targets[:, trained], "prob": probs_unit[:, trained],
                               "mask": mask[:, trained]},
                              keys=metric_keys, n_boot=n_boot, seed=seed)
    unseen: dict[str, dict] = {}
    for name in holdout:
        c = labels.index(name)
        partner, control = swaps[name][0]
        values = metrics_with_ci(_unseen_fn, {"target": targets[:, c], "prob": probs_unit[:, c],
                                              "swapped": control, "mask": mask[:, c]},
                                 n_boot=n_boot, seed=seed)
        rows = mask[:, c]
        each = {p: binary_metrics(targets[rows, c].astype(int), v[rows])["auroc"] for p, v in swaps[name]}
        unseen[name] = {**values, "swapped_with": partner, "auroc_swapped_each": each,
                        "positives": int(targets[rows, c].sum()), "n": int(rows.sum())}
        results.update({f"unseen_{label_key(name)}_{k}": v for k, v in values.items()})
    thresholds_source = "ORACLE: tuned on this evaluated set" if oracle else \
        f"validation ({meta.get('threshold_rule', 'f1')})"
    results.update({f"threshold_{k}": float(t) for k, t, s in zip(keys, thresholds, trained) if s})
    results.update({"split": split, "csv": str(table.csv), "unit": unit, "n_units": len(frame), "n_images": len(table),
                    "stage": meta["stage"], "thresholds_from": thresholds_source,
                    "holdout_classes": ", ".join(holdout)})
    for j, key in enumerate(keys):
        frame[f"label_{key}"] = np.where(mask[:, j], targets[:, j], np.nan)
        frame[f"prob_{key}"] = probs_unit[:, j]
        if trained[j]:
            frame[f"pred_{key}"] = (probs_unit[:, j] >= thresholds[j]).astype(int)
    for name in holdout:
        frame[f"prob_swapped_{label_key(name)}"] = swaps[name][0][1]
    rows = []
    for j, (name, key) in enumerate(zip(labels, keys)):
        if not trained[j]:
            continue
        row = {"disease": name, "positives": int(targets[mask[:, j], j].sum())}
        for metric in PER_CLASS:
            row[metric] = ci_cell(results, f"{metric}_{key}")
        row["threshold"] = float(thresholds[j])
        rows.append(row)
    what = "studies" if unit == "study" else "images"
    title = (f"{'ORACLE thresholds - ' if oracle else ''}MAVL CheXpert {meta['stage']} ({meta['preset']}), "
             f"{split} split ({len(frame)} {what}, {len(table)} images)")
    extra = (f"Thresholds: {thresholds_source}. Unit: {unit}"
             + (" (the maximum probability over a study's views)" if unit == "study" else "")
             + f".\n\n## Per disease (95% bootstrap CI over {what}, {n_boot} resamples)\n\n" + markdown_table(rows))
    if unseen:
        unseen_rows = [{"unseen disease": name, "positives": v["positives"],
                        "AUROC, own descriptions": f"{v['auroc']:.3f} [{v['auroc_ci_low']:.3f}, "
                                                   f"{v['auroc_ci_high']:.3f}]",
                        "AUROC, descriptions swapped (control)":
                            f"{v['auroc_swapped']:.3f} [{v['auroc_swapped_ci_low']:.3f}, "
                            f"{v['auroc_swapped_ci_high']:.3f}] ({v['swapped_with']}'s)"}
                       for name, v in unseen.items()]
        extra += ("\n## Unseen diseases (held out of every phase: scored from their descriptions alone)\n\n"
                  + markdown_table(unseen_rows))
    extra += "\n" + " ".join(f"![roc {k}](figures/roc_{split}_{k}.png)" for k in keys)
    if split == "test" and unit == "study" and set(REFERENCES) & set(seen_labels):
        extra += "\n\n" + reference_table(seen_labels, results)
    prefix = Path("oracle") if oracle else Path()
    with result_set(run_dir) as staging:
        atomic_write_text(staging / prefix / "predictions" / f"{split}.csv", frame.to_csv(index=False))
        for j, key in enumerate(keys):
            rows_j = mask[:, j]
            y = targets[rows_j, j].astype(int)
            if 0 < y.sum() < len(y):
                plots.roc_curve(y, probs_unit[rows_j, j], staging / prefix / "figures" / f"roc_{split}_{key}.png")
        write_results(staging / prefix, results, title, extra)
        atomic_write_json(staging / prefix / "results.json", json_safe({**results, "unseen": unseen}))
    return {**results, "unseen": unseen}


REFERENCES = {
    "Atelectasis": 0.858, "Cardiomegaly": 0.854, "Consolidation": 0.939, "Edema": 0.941, "Pleural Effusion": 0.936,
}
"""CheXpert paper (Irvin et al., AAAI 2019, Table 2): validation AUROC on the real 200-study valid.csv, the best
uncertainty policy per finding (U-Ones: Atelectasis, Edema; U-MultiClass: Cardiomegaly, Pleural Effusion;
U-SelfTrained: Consolidation)."""


def reference_table(labels: tuple[str, ...], results: dict) -> str:
    """Published numbers beside ours: references on other data (real CheXpert), never a comparison of methods."""
    rows = []
    for name in labels:
        if name not in REFERENCES:
            continue
        key = label_key(name)
        rows.append({"finding": name, "ours (this data)": f"{results[f'auroc_{key}']:.3f}",
                     "CheXpert paper, real valid.csv": f"{REFERENCES[name]:.3f}",
                     "LRFL": "per-class values not retrieved (not guessed)"})
    return ("## Published per-class AUROC, for reference only (other data: real CheXpert, DenseNet-121 / ViT-B; "
            "not comparable with a phantom)\n\n" + markdown_table(rows))


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("run_dir",), reads=("data_root", "test_csv"), lock="run_dir")
    evaluate_run(args.run_dir, args.split, args.data_root, args.test_csv, args.oracle_thresholds, args.n_boot,
                 args.device, args.seed, args.batch_size, args.skip_bad, args.unit)
    out = args.run_dir / ("oracle" if args.oracle_thresholds else "") / "results.md"
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
