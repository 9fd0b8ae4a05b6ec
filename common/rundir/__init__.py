"""The run directory, in one place: its layout, atomic writes, folders swapped in whole, result sets, the resume
state and the output-dir policy. Every medvl tool that reads or writes a run goes through here.

    files     atomic writes (bytes, text, JSON, figures); readers of run tables and logs (CSV, JSON lines)
    swap      ``staged_dir``/``swap_dir`` (a folder replaced whole), ``result_set`` (files committed together),
              ``recover_results`` (finishes what a killed writer committed)
    layout    the names (``best/``, ``checkpoints/last/``, ``metrics.jsonl`` ...), ``FLOOR_OUTPUTS``,
              ``find_model_dir``, the loop's history file
    weights   a model's safetensors + ``model.json`` with provenance (``save_model``, ``load_model_files``)
    resume    ``checkpoints/last/``: written whole (``save_last``), read back, and checked (``check_resume``)
    policy    ``check_output_dir`` (resume / overwrite / refuse) and ``clear_run`` (what ``--overwrite`` removes)

``model.json``'s schema and the one run loader are ``common.runs``; the training loop is ``common.engine``.
"""

from common.rundir.files import (
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_csv,
    read_jsonl,
)
from common.rundir.layout import (
    BEST_DIR,
    CONFIG_FILE,
    FLOOR_OUTPUTS,
    HISTORY_FILE,
    LAST_DIR,
    LOG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    find_model_dir,
    read_history,
    write_history,
)
from common.rundir.policy import check_output_dir, clear_run
from common.rundir.resume import RESUMABLE_CHANGES, check_resume, find_resume_dir, save_last
from common.rundir.swap import committed_dir, pending_dirs, recover_results, result_set, staged_dir, swap_dir
from common.rundir.weights import (
    environment_versions,
    git_sha,
    load_model_files,
    load_model_state,
    model_state,
    read_model_json,
    read_weights,
    require_keys,
    save_model,
    tied_keys,
)

__all__ = ["atomic_save_figure", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_csv",
           "read_jsonl", "BEST_DIR", "CONFIG_FILE", "FLOOR_OUTPUTS", "HISTORY_FILE", "LAST_DIR", "LOG_FILE",
           "META_FILE", "WEIGHTS_FILE", "find_model_dir", "read_history", "write_history", "check_output_dir",
           "clear_run", "RESUMABLE_CHANGES", "check_resume", "find_resume_dir", "save_last", "committed_dir",
           "pending_dirs", "recover_results", "result_set", "staged_dir", "swap_dir", "environment_versions",
           "git_sha", "load_model_files", "load_model_state", "model_state", "read_model_json", "read_weights",
           "require_keys", "save_model", "tied_keys"]
