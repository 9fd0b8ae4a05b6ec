"""Former home of the run-directory files; everything here now lives in ``common.rundir`` (kept so that existing
imports keep working: new code imports from ``common.rundir``)."""

from common.rundir.files import (  # noqa: F401
    _atomic_replace,
    _umask_mode,
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_csv,
    read_jsonl,
)
from common.rundir.layout import BEST_DIR, LAST_DIR, META_FILE, WEIGHTS_FILE, find_model_dir  # noqa: F401
from common.rundir.swap import (  # noqa: F401
    COMMIT_FILE,
    PENDING_DIR,
    committed_dir,
    pending_dirs,
    recover_results,
    result_set,
    staged_dir,
    swap_dir,
)
from common.rundir.weights import (  # noqa: F401
    environment_versions,
    git_sha,
    load_model_files,
    load_model_state,
    model_state,
    require_keys,
    save_model,
    tied_keys,
)
