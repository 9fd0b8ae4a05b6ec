"""``--precision`` resolution and repeated runs with different precisions in one process."""

import pytest
import torch

from common import device as device_mod
from common.device import mixed_precision
from common.engine import make_accelerator
from common.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize("amx", [True, False])
def test_auto_on_cpu_is_bf16_only_for_models_that_ask_and_cpus_with_amx(monkeypatch, amx):
    monkeypatch.setattr(device_mod, "cpu_has_amx_bf16", lambda: amx)
    assert mixed_precision("auto", CPU) == "no"
    assert mixed_precision("auto", CPU, cpu_bf16=True) == ("bf16" if amx else "no")
    assert mixed_precision("fp32", CPU, cpu_bf16=True) == "no"
    assert mixed_precision("bf16", CPU) == "bf16"
    with pytest.raises(ConfigError, match="--precision"):
        mixed_precision("fp16", CPU)


def test_a_second_run_in_the_same_process_may_change_precision():
    first = make_accelerator(CPU, "no")
    assert first.mixed_precision == "no"
    second = make_accelerator(CPU, "bf16")
    assert second.mixed_precision == "bf16"
    with second.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert make_accelerator(CPU, "no").mixed_precision == "no"
