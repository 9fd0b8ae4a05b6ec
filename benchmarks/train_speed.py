"""Training speed of the pneumonia pipeline against a plain PyTorch loop, side by side in one process.

    python -m benchmarks.train_speed --device cpu --epochs 1 --train-limit 1000
    python -m benchmarks.train_speed --device cuda --epochs 10 --json speed.json     # both precisions, one run

The medvl side is ``pneumonia.train`` with the recipe ``configs/pneumonia/train.warmup.yaml`` (ResNet-18 with the
small-image stem, fused AdamW, warm-up + cosine, channels-last, batch augmentation on the device, validation and a
checkpoint every epoch), run through the same ``run(args)`` as ``python -m pneumonia.train``; ``--medvl-flags``
adds flags to it (``"--no-channels-last"``, ``"--compile default"``). The reference is the loop a user writes in
ten minutes: torchvision's ResNet-18 with the same stem, the whole split as one tensor on the device, Adam, no
augmentation, no validation, at medvl's precision (``--reference-precision match``, the default: the same autocast
dtype, so the ratio compares loops, not number formats) and also in fp32 (the second ratio,
``ratio_fp32_reference``: what a user's plain fp32 loop costs against medvl's default). All sides see the same
images for the same epochs with the same batch size and learning rate, on the same device, after one shared warm-up
step (CUDA context, cuDNN / oneDNN kernels).

Seconds per epoch count the training batches only on both sides; medvl's validation and checkpoints show in its
whole-run wall time. On a shared machine one side can land in a busy spell: ``--repeats`` alternates the order
and averages. ratio = reference seconds / medvl seconds: above 1, medvl is faster. Test AUROC is computed
the same way for both, from medvl's best checkpoint (by validation AUROC) and the reference's last weights.
Data: PneumoniaMNIST from ``--data-root``; by default the copy embedded in ``data/samples/medmnist`` (or in
``../shared/data/medmnist`` beside the repository), else the CXR phantom in MedMNIST format (``python -m
common.phantoms cxr --format medmnist``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.metrics import roc_auc_score

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import mixed_precision, pick_device
from common.errors import ConfigError, cli_entry
from common.phantoms.cxr import write_medmnist
from common.rundir import atomic_write_text
from common.runs import load_run
from pneumonia import train
from pneumonia.data import SIZES, load_medmnist, npz_name, to_tensor
from pneumonia.model import build_from_record, predict_proba

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pneumonia" / "train.warmup.yaml"
DEFAULT_ROOTS = (REPO / "data" / "samples" / "medmnist", REPO.parent / "shared" / "data" / "medmnist")
PHANTOM_SIZE = 5856  # as many images as PneumoniaMNIST
REFERENCE_PRECISIONS = ("match", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=None, help="default: the config's (10)")
    parser.add_argument("--train-limit", type=positive_int, default=None, help="train on the first N images only")
    parser.add_argument("--image-size", type=int, default=28, choices=SIZES, help="PneumoniaMNIST image side")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="directory with pneumoniamnist[_SIZE].npz (default: the embedded PneumoniaMNIST, else "
                             "a phantom)")
    parser.add_argument("--medvl-flags", default="",
                        help="extra flags for the medvl run, written with '=': --medvl-flags='--no-channels-last'")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="time each side this many times in alternating order (medvl, reference, reference, "
                             "medvl ...) and average, so both share the machine's busy and quiet spells")
    parser.add_argument("--zero-init-residual", action="store_true",
                        help="start the reference's residual blocks as the identity (last BatchNorm at zero), as "
                             "timm's ResNet in medvl starts")
    parser.add_argument("--reference-precision", choices=REFERENCE_PRECISIONS, default="match",
                        help="match: the reference autocasts as medvl does (the headline ratio compares loops at equal "
                             "precision); fp32: the headline is against an fp32 reference. Both ratios are printed")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser


def reference_model(zero_init_residual: bool = False) -> torch.nn.Module:
    """torchvision's ResNet-18 with the small-image stem of ``pneumonia.model`` (3x3 stride-1 conv, no max-pool)."""
    model = torchvision.models.resnet18(num_classes=1, zero_init_residual=zero_init_residual)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(images: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int,
                   device: torch.device, zero_init_residual: bool = False,
                   autocast: str = "no") -> tuple[torch.nn.Module, list[float]]:
    """The plain loop: one device tensor, a permutation per epoch, Adam, fp32 weights with the forward pass in
    ``autocast`` (``no``, ``bf16`` or ``fp16``; fp16 with a gradient scaler). Returns the model and epoch times."""
    torch.manual_seed(seed)
    model = reference_model(zero_init_residual).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    dtype = AUTOCAST_DTYPES.get(autocast)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == "fp16")
    x = to_tensor(images).to(device)
    y = torch.as_tensor(labels, dtype=torch.float32).to(device)
    generator = torch.Generator().manual_seed(seed)
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=generator).to(device)
        for first in range(0, len(x), batch_size):
            index = order[first : first + batch_size]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x[index]).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y[index])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return model, seconds


@torch.no_grad()
def reference_scores(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([torch.sigmoid(model(to_tensor(images[s : s + batch]).to(device))[:, 0]).cpu().numpy()
                           for s in range(0, len(images), batch)])


def warm_up(device: torch.device, size: int, batch_size: int, channels_last: bool) -> None:
    """A training step of a throwaway network in each memory layout the two sides use, so that neither pays for
    starting the device and building its kernels."""
    for layout in (torch.contiguous_format, torch.channels_last) if channels_last else (torch.contiguous_format,):
        model = reference_model().to(device, memory_format=layout)
        optimizer = torch.optim.Adam(model.parameters())
        x = torch.randn(batch_size, 1, size, size, device=device).contiguous(memory_format=layout)
        F.binary_cross_entropy_with_logits(model(x).squeeze(1), torch.ones(batch_size, device=device)).backward()
        optimizer.step()
    synchronize(device)


def data_root(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """Where the data is, and a word for the table: the given root, PneumoniaMNIST, or a new phantom."""
    if args.data_root is not None:
        return args.data_root, str(args.data_root)
    for root in DEFAULT_ROOTS:
        if (root / npz_name(args.image_size)).is_file():
            return root, "PneumoniaMNIST"
    write_medmnist(scratch / "phantom", n=PHANTOM_SIZE, seed=0, size=args.image_size)
    return scratch / "phantom", f"CXR phantom ({PHANTOM_SIZE} images)"


def medvl_arguments(args: argparse.Namespace, root: Path, out: Path, device: torch.device) -> argparse.Namespace:
    """The pneumonia trainer's arguments: its default config, this benchmark's data, device, epochs and flags."""
    argv = ["--config", str(CONFIG), "--data-root", str(root), "--output-dir", str(out), "--device", str(device),
            "--seed", str(args.seed), "--image-size", str(args.image_size), "--no-progress", "--overwrite"]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.train_limit is not None:
        argv += ["--train-limit", str(args.train_limit)]
    return parse_args(train.get_args_parser(), argv + shlex.split(args.medvl_flags))


def table(rows: list[dict]) -> str:
    """One row per loop; ratio = that loop's seconds / medvl's (above 1: medvl is faster)."""
    lines = ["| loop | autocast | s / epoch (training) | images / s | ratio (s / medvl s) | test AUROC | whole run s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['precision']} | {r['seconds']:.2f} | {r['images_per_s']:,.0f} "
                     f"| {r['ratio']:.2f} | {r['auroc']:.4f} | {r['wall']:.1f} |")
    return "\n".join(lines)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    device = pick_device(args.device)
    if device.type == "mps":
        raise ConfigError("--device", "this benchmark times cpu or cuda")
    with tempfile.TemporaryDirectory(prefix="train_speed_") as scratch:
        root, source = data_root(args, Path(scratch))
        data = load_medmnist(root, args.image_size)
        out = args.output_dir or Path(scratch) / "medvl"
        n_train = min(len(data.labels["train"]), args.train_limit or len(data.labels["train"]))
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        print(f"{source}, {args.image_size} px, {n_train} training images; device {device}{gpu}; torch "
              f"{torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.machine()}", flush=True)
        medvl_args = medvl_arguments(args, root, out, device)
        autocast = mixed_precision(medvl_args.precision, device, train.CPU_BF16)
        # The references: at medvl's autocast and in fp32 (one and the same when medvl runs in fp32).
        references = {"reference": autocast if args.reference_precision == "match" else "no"}
        other = "no" if args.reference_precision == "match" else autocast
        if other != references["reference"]:
            references["reference_other"] = other
        warm_up(device, args.image_size, medvl_args.batch_size, medvl_args.channels_last)
        sides = ["medvl", *references]
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        walls: dict[str, list[float]] = {side: [] for side in sides}
        auroc: dict[str, float] = {}
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                if side == "medvl":
                    seconds[side] += train.run(medvl_args).epoch_seconds
                    synchronize(device)
                else:
                    reference, epoch_seconds = reference_loop(data.images["train"][:n_train],
                                                              data.labels["train"][:n_train], medvl_args.epochs,
                                                              medvl_args.batch_size, medvl_args.lr, args.seed, device,
                                                              args.zero_init_residual, references[side])
                    seconds[side] += epoch_seconds
                walls[side].append(time.perf_counter() - start)
                if side not in auroc:  # every repeat trains the same seeded run; evaluated once, untimed
                    if side == "medvl":
                        model = load_run(out, "pneumonia", build_from_record, stage="train", device=device).model
                        scores = predict_proba(model, data.images["test"], device=device)
                    else:
                        scores = reference_scores(reference, data.images["test"], device)
                    auroc[side] = float(roc_auc_score(data.labels["test"], scores))
    per_epoch = {side: statistics.mean(values) for side, values in seconds.items()}
    precision_of = {"medvl": autocast, **references}
    fp32_side = next((side for side in references if references[side] == "no"), None)
    equal_side = next((side for side in references if references[side] == autocast), None)
    ratio = per_epoch["reference"] / per_epoch["medvl"]
    ratio_equal = per_epoch[equal_side] / per_epoch["medvl"] if equal_side else None
    ratio_fp32 = per_epoch[fp32_side] / per_epoch["medvl"] if fp32_side else None
    rows = [{"name": "medvl pneumonia.train" + (f" {args.medvl_flags}" if args.medvl_flags else ""),
             "precision": autocast, "seconds": per_epoch["medvl"], "images_per_s": n_train / per_epoch["medvl"],
             "ratio": 1.0, "auroc": auroc["medvl"], "wall": statistics.mean(walls["medvl"])}]
    for side in references:
        rows.append({"name": "reference loop" + (" (zero-init residual)" if args.zero_init_residual else ""),
                     "precision": precision_of[side], "seconds": per_epoch[side],
                     "images_per_s": n_train / per_epoch[side], "ratio": per_epoch[side] / per_epoch["medvl"],
                     "auroc": auroc[side], "wall": statistics.mean(walls[side])})
    print(f"{medvl_args.epochs} epoch(s) x {args.repeats} repeat(s), batch {medvl_args.batch_size}, lr "
          f"{medvl_args.lr}; medvl precision "
          f"{medvl_args.precision} (autocast: {autocast}), augment "
          f"{medvl_args.augment}, channels-last {medvl_args.channels_last}, "
          f"compile {medvl_args.compile}")
    print(table(rows))
    print(f"ratio at equal precision ({autocast}): {ratio_equal:.2f}; against an fp32 reference: {ratio_fp32:.2f}"
          if ratio_equal is not None and ratio_fp32 is not None else f"ratio: {ratio:.2f}")
    if args.json is not None:
        record = {"ratio": ratio, "ratio_equal_precision": ratio_equal, "ratio_fp32_reference": ratio_fp32,
                  "reference_precision": args.reference_precision,
                  "auroc_medvl": auroc["medvl"], "auroc_reference": auroc["reference"],
                  "seconds_per_epoch_medvl": per_epoch["medvl"], "seconds_per_epoch_reference": per_epoch["reference"],
                  "epoch_seconds_medvl": seconds["medvl"], "epoch_seconds_reference": seconds["reference"],
                  "wall_s_medvl": walls["medvl"], "wall_s_reference": walls["reference"], "epochs": medvl_args.epochs,
                  "repeats": args.repeats, "zero_init_residual": args.zero_init_residual,
                  "train_images": n_train, "image_size": args.image_size, "device": str(device), "data": source,
                  "medvl_flags": args.medvl_flags,
                  "medvl_autocast": autocast,
                  "command": shlex.join(["python", "-m", "benchmarks.train_speed",
                                         *(argv if argv is not None else sys.argv[1:])])}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
