"""Phase 1: reconstruction pre-training of the U-Net's image encoder on unlabeled radiographs.

Example:
    python -m cxr_localize.pretrain --data-root data/iu_phantom --encoder-weights none \\
        --output-dir runs/cxr_localize/pretrain --epochs 3

With ``--mask-ratio 0`` the U-Net copies its input through the skip connections, which teaches the encoder
little; by default half the patches are blanked and the loss is taken on the blanked pixels only (masked image
modelling), so the encoder has to model lung, heart and rib context. Images of validation and test patients are
not trained on (the same patient split as phase 2). Reported on the validation images: PSNR and SSIM of the
reconstructed image (visible pixels kept, blanked ones predicted), plus samples; ``best/`` holds the encoder alone,
for
``python -m cxr_localize.train --encoder-init RUN``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch.utils.data import DataLoader

from common.cli import (
    MedvlArgumentParser,
    base_parser,
    config_text,
    finite_float,
    nonnegative_float,
    parse_args,
    positive_int,
    require,
)
from common.engine import add_train_args, check_run_setup, config_from_args, fit
from common.errors import ConfigError, cli_entry
from common.images import IMAGENET_MEAN, IMAGENET_STD
from common.plots import overlay_panels
from common.run_guard import guard_command, path_values
from common.rundir import result_set
from common.runs import model_record, save_run_model
from common.tables import metrics_with_ci, write_results
from cxr_localize.data import ImageDataset, load_iu
from cxr_localize.model import build_unet
from cxr_localize.shared import add_data_args, add_encoder_args, add_n_figures_arg, split_table

log = logging.getLogger("medvl.cxr_localize")


def mask_ratio(text) -> float:
    """Share of patches blanked: 1 would leave nothing to reconstruct from."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(output_dir=True, seed=True, device=True, precision=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, projection="all")
    add_encoder_args(parser)
    group = parser.add_argument_group("reconstruction")
    group.add_argument("--mask-ratio", type=mask_ratio, default=0.5, help="fraction of patches blanked (0: plain)")
    group.add_argument("--mask-patch", type=positive_int, default=8, help="patch side in pixels")
    group.add_argument("--ssim-weight", type=nonnegative_float, default=0.0,
                       help="add this times (1 - SSIM) to the MSE")
    add_n_figures_arg(group, default=4)
    add_train_args(parser, epochs=3, batch_size=16, lr=1e-3, weight_decay=1e-4, monitor="val_psnr", mode="max")
    return parser


def patch_mask(shape: tuple[int, ...], ratio: float, patch: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 on the blanked patches."""
    batch, _, height, width = shape
    grid = torch.rand(batch, 1, -(-height // patch), -(-width // patch), generator=generator)
    mask = (grid < ratio).float().repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return mask[..., :height, :width].to(device)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Normalised grey channel back to [0, 1]."""
    return (x * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1)


class ReconstructionTask:
    """Masked-patch MSE (plus optional SSIM); validation PSNR/SSIM of the reconstructed images."""

    metric_names = ("psnr", "ssim", "loss")

    def __init__(self, meta: dict, mask_ratio: float, mask_patch: int, ssim_weight: float, run_dir: Path,
                 n_figures: int, seed: int):
        self.meta, self.mask_ratio, self.mask_patch, self.ssim_weight = meta, mask_ratio, mask_patch, ssim_weight
        self.run_dir, self.n_figures, self.seed = run_dir, n_figures, seed
        self.last: dict[str, np.ndarray] = {}
        self._ssim = None
        if ssim_weight > 0:
            try:
                from torchmetrics.functional.image import structural_similarity_index_measure
            except ImportError as err:
                raise ConfigError("--ssim-weight", "the SSIM loss needs torchmetrics (pip install torchmetrics); "
                                                   "or pass --ssim-weight 0") from err
            self._ssim = structural_similarity_index_measure

    def _forward(self, model, images: torch.Tensor, generator: torch.Generator | None = None):
        target = images[:, :1]
        if self.mask_ratio <= 0:
            return model(images), target, torch.ones_like(target)
        mask = patch_mask(images.shape, self.mask_ratio, self.mask_patch, generator, images.device)
        return model(images * (1 - mask)), target, mask

    def _loss(self, output, target, mask) -> torch.Tensor:
        loss = ((output.float() - target) ** 2 * mask).sum() / mask.sum().clamp_min(1)
        if self._ssim is not None:
            loss = loss + self.ssim_weight * (1 - self._ssim(to_unit(output.float()), to_unit(target), data_range=1.0))
        return loss

    def training_loss(self, model, batch) -> torch.Tensor:
        return self._loss(*self._forward(model, batch["image"]))

    def validate(self, model, loader: DataLoader, device) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed)
        shown, recon, truth, losses = [], [], [], []
        for batch in loader:
            images = batch["image"]
            output, target, mask = self._forward(model, images, generator)
            losses.append(self._loss(output, target, mask).item() * len(images))
            shown.append(to_unit(images[:, :1] * (1 - mask))[:, 0].cpu().numpy())
            recon.append(to_unit(output.float() * mask + target * (1 - mask))[:, 0].cpu().numpy())
            truth.append(to_unit(target)[:, 0].cpu().numpy())
        shown, recon, truth = (np.concatenate(a) for a in (shown, recon, truth))
        psnr = np.array([peak_signal_noise_ratio(t, r, data_range=1.0) for t, r in zip(truth, recon)])
        ssim = np.array([structural_similarity(t, r, data_range=1.0) for t, r in zip(truth, recon)])
        self.last = {"shown": shown, "recon": recon, "truth": truth, "psnr": psnr, "ssim": ssim}
        return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "loss": sum(losses) / len(truth)}

    def save_best(self, model, metrics, directory: Path) -> None:
        save_run_model(directory, model.encoder, {**self.meta, "val_metrics": metrics})
        if not self.last:
            return
        k = min(self.n_figures, len(self.last["truth"]))
        rows = [[self.last["shown"][i], self.last["recon"][i], self.last["truth"][i]] for i in range(k)]
        titles = [["input (masked)" if self.mask_ratio > 0 else "input", "reconstruction", "original"]] * k
        results = metrics_with_ci(lambda a: {"psnr": a["psnr"].mean(), "ssim": a["ssim"].mean()},
                                  {"psnr": self.last["psnr"], "ssim": self.last["ssim"]}, n_boot=1000, seed=self.seed)
        results.update({"epoch": metrics.get("epoch"), "n_val_images": len(self.last["truth"]),
                        "mask_ratio": self.mask_ratio})
        with result_set(self.run_dir) as staging:
            links = ""
            if k:
                figure = overlay_panels(rows, titles, staging / "figures" / "reconstructions.png")
                links = f" Samples: [{figure.name}](figures/{figure.name})"
            write_results(staging, results, "cxr_localize phase 1: reconstruction (validation images)",
                          f"Full-image reconstruction of masked inputs.{links}")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("data_root", "cache_dir"), lock="output_dir", create=True,
                  extra_reads=path_values(args, "encoder_weights"))
    require(args, "output_dir", "data_root")
    run_dir = args.output_dir
    check_run_setup(config_from_args(args), run_dir)
    _, split_text = split_table(args, with_masks=False)
    samples = load_iu(args.data_root, image_size=args.image_size, projection=args.projection, with_masks=False,
                      splits=("train", "val"), split_level=args.split_level, seed=args.split_seed,
                      skip_bad=args.skip_bad, limit=args.limit)
    train, val = samples.subset("train"), samples.subset("val")
    log.info("phase 1: %d training and %d validation images", len(train), len(val))
    torch.manual_seed(args.seed)
    model = build_unet(args.encoder, args.encoder_weights, classes=1, decoder_channels=args.decoder_channels,
                       cache_dir=args.cache_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    meta = model_record(
        pipeline="cxr_localize", stage="pretrain", preset=args.encoder, kwargs={}, labels=[],
        preprocessing={"image_size": args.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "channels": "grey x3"},
        thresholds={}, monitor=args.monitor if len(val) else "train_loss",
        data={"root": str(Path(args.data_root).resolve()), "projection": args.projection, "limit": args.limit,
              "split_level": args.split_level, "split_seed": args.split_seed, "skipped": dict(samples.skipped)},
        encoder_weights=args.encoder_weights, mask_ratio=args.mask_ratio, mask_patch=args.mask_patch)
    task = ReconstructionTask(meta, args.mask_ratio, args.mask_patch, args.ssim_weight, run_dir, args.n_figures,
                              args.seed)
    val_set = ImageDataset(val.images) if len(val) else None
    monitor = {} if val_set is not None else {"monitor": "train_loss", "mode": "min"}
    result = fit(model, optimizer, ImageDataset(train.images, args.augment), val_set, task,
                 config_from_args(args, **monitor), run_dir,
                 run_files={"config.yaml": config_text(args), "split.csv": split_text})
    if not result.completed:
        print(f"stopped at step {result.global_step} (--max-steps); continue with --resume")
    else:
        print(f"phase-1 encoder in {run_dir / 'best'} (val PSNR {result.best_value})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
