"""Caption every tile with a vision-language model, into a resumable JSONL file.

Example (offline, tiny random VLM; the real one is ``--vlm medgemma-4b --quantization 4bit`` on a T4):
    python -m pathology_brats.caption --data-root data/histology_phantom --vlm tiny-gemma3 --out captions.jsonl

The prompt (ours) asks for the visible tissue features without naming a class, as the seed intended, so that the
caption is evidence rather than a second classifier. Decoding is greedy. Lines are appended and flushed batch by
batch: a rerun skips the images already captioned, and a line cut short by a kill is dropped and redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.vlm import VLM_PRESETS, build_messages, generate_reports, load_vlm, processor_image_size
from pathology_brats.captions import read_captions
from pathology_brats.data import VAL_FOLDER, load_tiles
from pathology_brats.encoder import read_rgb
from pathology_brats.schema import SCHEMAS, get_schema

log = logging.getLogger("medvl.pathology_brats")

SYSTEM = ("You are a neuropathologist looking at haematoxylin and eosin stained patches of brain tissue. You "
          "describe only what is visible.")
USER = ("Describe this patch in two sentences: cell density, the size and shape of the nuclei, necrosis, vessels, "
        "and the background tissue. Do not name a diagnosis or a category.")


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True, precision=True, cache_dir=True, quantization=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--labels-csv", type=Path, default=None)
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="2025")
    parser.add_argument("--vlm", default="medgemma-4b",
                        help=f"preset ({', '.join(VLM_PRESETS)}), a save_pretrained folder or a hub id")
    parser.add_argument("--out", type=Path, required=True, help="captions JSONL (appended to; reruns resume)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--include-val", action=argparse.BooleanOptionalAction, default=True,
                        help="also caption <data-root>/val (the submission patches)")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def _complete_lines(path: Path) -> None:
    """Drop a last line cut short by a kill, so appended lines start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def caption_images(paths: list[Path], out: Path, vlm_name: str, quantization: str = "none", device: str = "auto",
                   precision: str = "auto", batch_size: int = 8, max_new_tokens: int = 200,
                   cache_dir: Path | None = None, trust_remote_code: bool = False) -> int:
    """Append a caption line for each of ``paths`` not yet in ``out``; returns how many were written."""
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a directory; name the JSONL file")
    _complete_lines(out)
    done = read_captions(out) if out.is_file() else {}
    todo = [p for p in paths if p.name not in done]
    if not todo:
        return 0
    vlm = load_vlm(vlm_name, quantization, pick_device(device), precision, cache_dir, trust_remote_code)
    height, width = processor_image_size(vlm.processor)
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch, chats = [], []
        for path in todo[start : start + batch_size]:
            try:
                image = read_rgb(path).resize((width, height))
            except DataError as err:
                log.warning("%s: %s; no caption", path, err.message)
                continue
            batch.append(path)
            chats.append(build_messages(image, SYSTEM, USER))
        if not batch:
            continue
        replies = generate_reports(vlm, chats, max_new_tokens)
        with open(out, "a", encoding="utf-8") as handle:
            for path, reply in zip(batch, replies):
                handle.write(json.dumps({"image": path.name, "caption": " ".join(reply.split())}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        written += len(batch)
        log.info("captioned %d of %d", written, len(todo))
    return written


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    tiles = load_tiles(args.data_root, get_schema(args.schema), args.labels_csv)
    paths = list(tiles.paths)
    val = Path(args.data_root) / VAL_FOLDER
    if args.include_val and val.is_dir():
        paths += sorted(p for p in val.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    written = caption_images(paths, args.out, args.vlm, args.quantization, args.device, args.precision,
                             args.batch_size, args.max_new_tokens, args.cache_dir, args.trust_remote_code)
    print(f"{args.out}: {written} new caption(s), {len(paths) - written} already there or unreadable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
