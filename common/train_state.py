"""Former home of the resume state; it now lives in ``common.rundir.resume`` (kept so that existing imports keep
working: new code imports from ``common.rundir.resume``)."""

from common.rundir.resume import (  # noqa: F401
    FORMAT,
    MODEL_FILE,
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    TASK_TENSORS,
    TRAINER_JSON,
    load_optimizer,
    load_rng,
    load_task_tensors,
    load_trainer,
    save_optimizer,
    save_rng,
    save_task_tensors,
    save_trainer,
)
from common.rundir.resume import load_last_model as load_model_state  # noqa: F401
from common.rundir.resume import save_last_model as save_model_state  # noqa: F401
