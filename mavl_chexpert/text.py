"""Phase 2: each disease's definition and aspect sentences, embedded one sentence at a time by a frozen encoder.

    python -m mavl_chexpert.text --text-encoder minilm --output-dir runs/mavl/text

``descriptions.json`` (ours, written for medvl) holds, for each of the 14 CheXpert observations, a one-line
definition and eight aspect sentences (opacity, shape, location, border, texture, fluid, patterns, other), as MAVL
decomposes a disease into visual aspects. Every sentence is embedded on its own (MAVL: [CLS] of Bio_ClinicalBERT
per sentence) rather than the seed's one embedding of all sentences concatenated; the pooling is the weights'
(``--text-pooling`` overrides it, and fusion runs record it in ``model.json``). Embeddings are cached as
``text_embeddings.safetensors`` with the encoder name and a hash of the descriptions, so a changed description or
encoder re-embeds and an unchanged one does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from common.cli import MedvlArgumentParser, base_parser, parse_args, require
from common.errors import DataError, cli_entry
from common.run_guard import guard_command
from common.rundir import atomic_write_bytes
from common.text_encoders import load_text_encoder, weights_pooling

log = logging.getLogger("medvl.mavl_chexpert")

DEFAULT_DESCRIPTIONS = Path(__file__).with_name("descriptions.json")
CACHE_FILE = "text_embeddings.safetensors"
TEXT_POOLINGS = ("cls", "mean")


def load_descriptions(path: Path, diseases: Sequence[str]) -> dict[str, list[str]]:
    """``{disease: [definition, aspect sentences...]}`` for ``diseases``; a missing disease is one error line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "descriptions file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=lambda pairs: _unique(pairs, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(path, "expected an object {disease: {definition, aspects}}")
    out = {}
    for disease in diseases:
        entry = data.get(disease)
        if entry is None:
            raise DataError(path, f"no description of {disease!r}, which is being trained")
        definition = entry.get("definition") if isinstance(entry, dict) else None
        aspects = entry.get("aspects") if isinstance(entry, dict) else None
        if not (isinstance(definition, str) and definition.strip() and isinstance(aspects, dict)
                and all(isinstance(v, str) and v.strip() for v in aspects.values())):
            raise DataError(path, f"{disease!r}: expected {{'definition': str, 'aspects': {{name: sentence}}}}")
        out[disease] = [entry["definition"], *entry["aspects"].values()]
    return out


def _unique(pairs: list[tuple[str, object]], path: Path) -> dict:
    """A JSON object whose key repeats (two descriptions of one disease, two sentences for one aspect) is refused:
    ``json`` would keep the last one without a word."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DataError(path, f"{key!r} is given twice; keep one")
        seen[key] = value
    return seen


def descriptions_hash(sentences: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(sentences, sort_keys=True).encode()).hexdigest()


def _pack(sentences: dict[str, list[str]], vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    diseases = list(sentences)
    most = max(len(v) for v in sentences.values())
    table = torch.zeros(len(diseases), most, vectors.shape[-1])
    mask = torch.zeros(len(diseases), most, dtype=torch.bool)
    row = 0
    for c, disease in enumerate(diseases):
        count = len(sentences[disease])
        table[c, :count] = vectors[row : row + count]
        mask[c, :count] = True
        row += count
    return table, mask


def write_cache(directory: Path, aspects: torch.Tensor, mask: torch.Tensor, encoder_name: str,
                sentences: dict[str, list[str]], pooling: str | None = None) -> Path:
    pooling = weights_pooling(encoder_name, pooling)
    data = save({"aspects": aspects.contiguous(), "mask": mask.to(torch.uint8)},
                metadata={"encoder": encoder_name, "descriptions_sha256": descriptions_hash(sentences),
                          "diseases": json.dumps(list(sentences)), "pooling": pooling})
    return atomic_write_bytes(Path(directory) / CACHE_FILE, data)


def embed_descriptions(sentences: dict[str, list[str]], encoder_name: str, cache_dir: Path | None = None,
                       hub_cache: Path | None = None, write: bool = True,
                       pooling: str | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(aspects (C, A, D), mask (C, A), reused): from ``cache_dir``'s cache when encoder, pooling and text match.

    ``pooling`` overrides the weights' own (``common.text_encoders.weights_pooling`` says which that is).

    With ``write``, fresh embeddings are cached in ``cache_dir``; a training script passes ``write=False`` and
    writes the cache itself once the run directory has been validated.
    """
    digest = descriptions_hash(sentences)
    pooling = weights_pooling(encoder_name, pooling)
    cache = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as handle:
                meta = handle.metadata() or {}
            if (meta.get("encoder") == encoder_name and meta.get("descriptions_sha256") == digest
                    and meta.get("pooling") == pooling):
                tensors = load_file(str(cache))
                return tensors["aspects"], tensors["mask"].bool(), True
            log.info("%s: encoder, pooling or descriptions changed; embedding again", cache)
        except (SafetensorError, OSError, KeyError) as err:
            log.warning("%s: unreadable cache (%s); embedding again", cache, err)
    encoder = load_text_encoder(encoder_name, cache_dir=hub_cache, pooling=pooling)
    flat = [s for group in sentences.values() for s in group]
    vectors = encoder.encode(flat)
    aspects, mask = _pack(sentences, vectors)
    if cache_dir is not None and write:
        write_cache(cache_dir, aspects, mask, encoder_name, sentences, pooling)
    return aspects, mask, False


def add_text_pooling_arg(parser) -> None:
    """``--text-pooling``: how sentence embeddings pool the encoder's token states (a property of the weights)."""
    parser.add_argument("--text-pooling", choices=TEXT_POOLINGS, default=None,
                        help="[CLS] state or mean of token states; default: what the weights were made for (the "
                             "preset's, or a local folder's sentence-transformers config / hub-cache preset)")


def get_args_parser() -> argparse.ArgumentParser:
    from mavl_chexpert.shared import add_descriptions_arg, add_labels_arg, add_text_encoder_arg  # shared reads this

    parent = base_parser(output_dir=True, cache_dir=True)
    parser = MedvlArgumentParser(description=__doc__, parents=[parent],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_encoder_arg(parser)
    add_descriptions_arg(parser)
    add_labels_arg(parser, default="all")
    add_text_pooling_arg(parser)
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from mavl_chexpert.data import resolve_labels

    args = parse_args(get_args_parser(), argv)
    guard_command(args, writes=("output_dir",), reads=("descriptions", "cache_dir"), lock="output_dir", create=True)
    require(args, output_dir="where text_embeddings.safetensors is written")
    sentences = load_descriptions(args.descriptions, resolve_labels(args.labels))
    aspects, mask, reused = embed_descriptions(sentences, args.text_encoder, args.output_dir, args.cache_dir,
                                               pooling=args.text_pooling)
    pooling = weights_pooling(args.text_encoder, args.text_pooling)
    print(f"{'reused' if reused else 'wrote'} {Path(args.output_dir) / CACHE_FILE}: {aspects.shape[0]} diseases, "
          f"{int(mask.sum())} sentences, {aspects.shape[-1]}-d ({args.text_encoder}, {pooling} pooling)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DEFAULT_DESCRIPTIONS", "CACHE_FILE", "TEXT_POOLINGS", "add_text_pooling_arg", "load_descriptions",
           "descriptions_hash", "embed_descriptions", "write_cache"]
