"""The output-dir policy of a training run: a folder that holds a run is continued only with ``--resume`` and
replaced only with ``--overwrite``, and an overwrite removes every output an earlier run left, the loop's
(``FLOOR_OUTPUTS``) and each declared pipeline's (``common.pipelines``), so no result of the earlier model stays
beside the new one."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.errors import ConfigError
from common.run_guard import LOCK_FILE
from common.rundir.layout import RUN_MARKERS
from common.rundir.resume import find_resume_dir


def check_output_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that would lose work: a file, or a previous run without ``--resume``/``--overwrite``.

    Reads only; nothing is written, so it can run before the data is loaded.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--output-dir", f"{run_dir} is a file, not a directory")
    if resume and overwrite:
        raise ConfigError("--overwrite", "cannot be combined with --resume")
    if resume:
        find_resume_dir(run_dir)
        return
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        if not overwrite:
            raise ConfigError("--output-dir", f"{run_dir} already holds a run; pass --resume to continue it or "
                                              "--overwrite to replace it")
        if not any((run_dir / name).exists() for name in RUN_MARKERS):
            raise ConfigError("--overwrite", f"{run_dir} is not empty and is not a medvl run directory; choose a new "
                                             "or empty --output-dir")


def clear_run(run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """``--overwrite``: remove what an earlier run wrote (and only that), once the new run has been validated: the
    loop's own outputs, ``extra`` (this run's ``run_files``) and every output a declared pipeline names."""
    from common.pipelines import matching_outputs, run_outputs  # here: common.pipelines reads this package's layout

    for path in matching_outputs(run_dir, (*run_outputs(), *extra)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
