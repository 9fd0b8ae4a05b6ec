"""The one place that calls ``from_pretrained``: hub ids and local directories, 4-bit / 8-bit, clear errors.

    python -c "from common.tiny import save_tiny_bert; save_tiny_bert('runs/tiny-bert')"
    python -c "import transformers as t, common.hf as h; print(h.load_pretrained(t.AutoModel, './runs/tiny-bert'))"

A hub id (``google/medgemma-4b-it``) and a directory written by ``save_pretrained`` go through the same call, so
code tested on a tiny local checkpoint runs the published one unchanged. Quantized loading uses one
``BitsAndBytesConfig`` for the whole project. ``trust_remote_code`` stays off unless a user flag turns it on.
Failures that are the user's to fix (offline and not cached, a path that does not exist, bitsandbytes that
cannot run here) become one-line ``ConfigError``/``DataError`` messages instead of tracebacks.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import BitsAndBytesConfig

from common.device import check_bitsandbytes, compute_dtype
from common.errors import ConfigError, DataError

QUANTIZATIONS = ("none", "4bit", "8bit")
OFFLINE_MESSAGE = ("not in the local Hugging Face cache and the hub is unreachable; pass a local directory in HF "
                   "format (save_pretrained) or connect")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def bnb_config(quantization: str, device: torch.device | str = "cpu") -> BitsAndBytesConfig | None:
    """The project's quantization recipe: NF4 with double quantization, or LLM.int8; ``None`` for ``none``.

    4-bit computes in ``compute_dtype(device)`` (bf16 on GPUs that have it). bitsandbytes is checked first, so a
    machine where it cannot run fails here with one line rather than inside a CUDA kernel.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError("--quantization", f"unknown value {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    check_bitsandbytes()
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(torch.device(device)))


def resolve_source(name_or_path: str | Path) -> str:
    """Return a local directory as a string, or a hub id unchanged; a path-like name that is missing is a DataError.

    A name counts as a path when it exists, is a ``Path``, starts with ``/``, ``.`` or ``~``, or has more than one
    ``/`` (hub ids are ``name`` or ``owner/name``).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(path, "expected a directory in Hugging Face format (save_pretrained), got a file")
        return str(path)
    looks_like_path = isinstance(name_or_path, Path) or text.startswith(("/", ".", "~")) or "\\" in text
    if looks_like_path or not _HUB_ID.match(text):
        raise DataError(text, "directory does not exist (expected a Hugging Face id like owner/name or a "
                              "save_pretrained directory)")
    return text


def _is_offline_miss(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, LocalEntryNotFoundError) or "couldn't connect" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(folder: Path) -> None:
    """A local checkpoint folder whose weights exist only as pickles is one DataError naming the file: medvl never
    unpickles (a pickle can run code), so such a folder must be converted to safetensors first."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise DataError(pickles[0], "pickle-format weights are never loaded (unpickling can run code); save the "
                                    "model with safetensors (save_pretrained(..., safe_serialization=True))")


def _call(loader, source: str, is_local: bool, **kwargs: Any):
    try:
        return loader(source, **kwargs)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(source, f"refused a pickle-format file ({first_line[:120]})") from err
    except OSError as err:
        if not is_local and _is_offline_miss(err):
            raise ConfigError(source, OFFLINE_MESSAGE) from err
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_local:
            raise DataError(source, f"cannot load a Hugging Face checkpoint from here ({first_line})") from err
        raise ConfigError(source, f"cannot load from the Hugging Face hub ({first_line})") from err


def load_pretrained(cls, name_or_path: str | Path, *, quantization: str = "none", dtype: torch.dtype | None = None,
                    device_map: Any = None, cache_dir: str | Path | None = None, trust_remote_code: bool = False,
                    device: torch.device | str | None = None, refuse_missing_weights: bool = False,
                    optional_weights: tuple[str, ...] = (), **kwargs: Any):
    """Load a model class (``Gemma3ForConditionalGeneration``, ``AutoModel`` ...) from a hub id or local directory.

    Args:
        cls: anything with ``from_pretrained``.
        name_or_path: hub id or a ``save_pretrained`` directory.
        quantization: ``none``, ``4bit`` (NF4) or ``8bit``; see ``bnb_config``.
        dtype: dtype of the unquantized weights; by default ``compute_dtype(device)`` when quantized, else the
            checkpoint's own.
        device_map: passed to transformers; by default everything goes straight to ``device``.
        cache_dir: Hugging Face cache directory.
        trust_remote_code: run code shipped with the checkpoint; only from an explicit user flag.
        device: where the model ends up (default CPU).
        refuse_missing_weights: a checkpoint that lacks weights of ``cls`` (transformers would initialise them at
            random and only log it: a folder of another model loads "successfully") is one DataError.
        optional_weights: name prefixes that may be missing all the same (parts the caller never uses).
        **kwargs: further ``from_pretrained`` arguments.

    Returns:
        The model in eval mode.
    """
    source = resolve_source(name_or_path)
    is_local = Path(source).is_dir()
    if is_local and not (Path(source) / "config.json").is_file():
        raise DataError(source, "no config.json: not a model saved with save_pretrained")
    if is_local:
        refuse_pickled_weights(Path(source))
    target = torch.device(device) if device is not None else torch.device("cpu")
    quant = bnb_config(quantization, target)
    if quant is not None:
        kwargs["quantization_config"] = quant
        dtype = dtype or compute_dtype(target)
    if device_map is None and (device is not None or quant is not None):
        device_map = {"": target.index if target.type == "cuda" and target.index is not None else target.type}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if refuse_missing_weights:
        kwargs["output_loading_info"] = True
    model = _call(cls.from_pretrained, source, is_local, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                  **kwargs)
    if refuse_missing_weights:
        model, info = model
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(optional_weights))
        if missing:
            raise DataError(source, f"{len(missing)} weight(s) of {cls.__name__} are not in this checkpoint (first: "
                                    f"{missing[0]}); it holds another model or another layout")
    return model.eval()


def load_processor(cls_or_auto, name_or_path: str | Path, *, cache_dir: str | Path | None = None,
                   trust_remote_code: bool = False, **kwargs: Any):
    """Load a processor or tokenizer (``AutoProcessor``, ``AutoTokenizer`` or a concrete class) like a model."""
    source = resolve_source(name_or_path)
    return _call(cls_or_auto.from_pretrained, source, Path(source).is_dir(), cache_dir=cache_dir,
                 trust_remote_code=trust_remote_code, **kwargs)


def load_config(name_or_path: str | Path, *, cache_dir: str | Path | None = None, trust_remote_code: bool = False):
    """A checkpoint's ``config.json`` as its config class (to choose a model class before loading weights)."""
    from transformers import AutoConfig

    source = resolve_source(name_or_path)
    return _call(AutoConfig.from_pretrained, source, Path(source).is_dir(), cache_dir=cache_dir,
                 trust_remote_code=trust_remote_code)


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (packed 4-bit/8-bit storage counted as stored)."""
    if hasattr(model, "get_memory_footprint"):
        return int(model.get_memory_footprint())
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))
