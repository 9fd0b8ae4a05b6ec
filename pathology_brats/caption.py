"""Caption every tile with a vision-language model, into a resumable JSONL file.

Example (offline, tiny random VLM; the real one is ``--vlm medgemma-4b --quantization 4bit`` on a T4):
    python -m pathology_brats.caption --data-root data/histology_phantom --vlm tiny-gemma3 --out captions.jsonl

The prompt asks for the visible tissue features without naming a class, as the seed intended, so that the caption is
evidence rather than a second classifier: ``--caption-prompt medvl`` (default) names the features to cover (density,
nuclei, necrosis, vessels, background) in two sentences; ``seed`` is the seed's wording (dominant features, their
significance; the question before the image). Decoding is greedy. Each line names the image by its path under
``--data-root``. Lines are appended and flushed batch by batch: a rerun skips the images already captioned, and a
line cut short by a kill is dropped and redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.cli import MedvlArgumentParser, base_parser, parse_args, positive_int
from common.device import pick_device
from common.errors import ConfigError, DataError, cli_entry
from common.run_guard import guard_command
from common.vlm import VLM_PRESETS, build_messages, generate_reports, load_vlm, processor_image_size
from pathology_brats.caption_files import match_captions, read_captions
from pathology_brats.data import VAL_FOLDER, load_tiles, tile_id
from pathology_brats.encoder import read_rgb
from pathology_brats.schema import get_schema
from pathology_brats.shared import add_data_root_arg, add_labels_csv_arg, add_schema_arg

log = logging.getLogger("medvl.pathology_brats")

@dataclass(frozen=True)
class CaptionPrompt:
    """A system turn and a question; ``text_first`` puts the question before the image."""

    system: str
    user: str
    text_first: bool = False


PROMPTS = {
    "medvl": CaptionPrompt(
        "You are a neuropathologist looking at haematoxylin and eosin stained patches of brain tissue. You describe "
        "only what is visible.",
        "Describe this patch in two sentences: cell density, the size and shape of the nuclei, necrosis, vessels, "
        "and the background tissue. Do not name a diagnosis or a category."),
    "seed": CaptionPrompt(
        "You are an expert neuropathologist with experience in histopathological analysis of glioblastoma tissue "
        "sections.",
        "Describe the most dominant histopathological features visible in this image.\n\n"
        "Base your descriptions on visible evidence such as cell morphology, tissue architecture, staining patterns, "
        "and structural abnormalities.\n\n"
        "Do **not** use or mention any class labels or predefined terms. Just describe what is visually present and "
        "why it is significant.", text_first=True),
}


def get_args_parser() -> argparse.ArgumentParser:
    parent = base_parser(device=True, precision=True, cache_dir=True, quantization=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_arg(parser, required=True)
    add_labels_csv_arg(parser)
    add_schema_arg(parser)
    parser.add_argument("--vlm", default="medgemma-4b",
                        help=f"preset ({', '.join(VLM_PRESETS)}), a save_pretrained folder or a hub id")
    parser.add_argument("--out", type=Path, required=True, help="captions JSONL (appended to; reruns resume)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="tiles per generation batch")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="longest caption generated, in tokens")
    parser.add_argument("--caption-prompt", choices=sorted(PROMPTS), default="medvl",
                        help="medvl: the features to describe, named; seed: the seed's prompt")
    parser.add_argument("--include-val", action=argparse.BooleanOptionalAction, default=True,
                        help="also caption <data-root>/val (the submission patches)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the VLM's own code from the hub (off by default)")
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
                   cache_dir: Path | None = None, trust_remote_code: bool = False, root: Path | None = None,
                   prompt: str = "medvl") -> int:
    """Append a caption line for each of ``paths`` not yet in ``out`` (named by their path under ``root``); returns
    how many were written."""
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a directory; name the JSONL file")
    if prompt not in PROMPTS:
        raise ConfigError("--caption-prompt", f"choose one of {', '.join(PROMPTS)}, not {prompt!r}")
    chosen = PROMPTS[prompt]
    _complete_lines(out)
    ids = {p: tile_id(p, root) for p in paths}
    done = match_captions(read_captions(out), list(ids.values()), out) if out.is_file() else {}
    todo = [p for p in paths if ids[p] not in done]
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
            chats.append(build_messages(image, chosen.system, chosen.user, chosen.text_first))
        if not batch:
            continue
        replies = generate_reports(vlm, chats, max_new_tokens)
        with open(out, "a", encoding="utf-8") as handle:
            for path, reply in zip(batch, replies):
                handle.write(json.dumps({"image": ids[path], "caption": " ".join(reply.split())}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        written += len(batch)
        log.info("captioned %d of %d", written, len(todo))
    return written


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("out",), reads=("labels_csv", "cache_dir"), beside=("data_root",))
    tiles = load_tiles(args.data_root, get_schema(args.schema), args.labels_csv)
    paths = list(tiles.paths)
    val = Path(args.data_root) / VAL_FOLDER
    if args.include_val and val.is_dir():
        paths += sorted(p for p in val.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    written = caption_images(paths, args.out, args.vlm, args.quantization, args.device, args.precision,
                             args.batch_size, args.max_new_tokens, args.cache_dir, args.trust_remote_code,
                             root=Path(args.data_root),
                             prompt=args.caption_prompt)
    print(f"{args.out}: {written} new caption(s), {len(paths) - written} already there or unreadable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
