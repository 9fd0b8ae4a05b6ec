"""The real GPU paths: bf16 autocast training through the loop, and 4-bit generation of the tiny VLM on CUDA.

Marked ``gpu``: skipped where no CUDA device is visible (see conftest), run in full on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from common import hf
from common.engine import TrainConfig, fit
from common.rundir import load_model_files, read_jsonl, save_model
from common.tiny import save_tiny_gemma3

pytestmark = pytest.mark.gpu


class _CudaTask:
    """Logistic regression that checks where its batches are and that autocast is on."""

    metric_names = ("loss",)

    def __init__(self):
        self.autocast_seen = []

    def training_loss(self, model, batch):
        x, y = batch
        assert x.is_cuda and y.is_cuda
        logits = model(x).squeeze(-1)
        self.autocast_seen.append(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits.float(), y)

    def validate(self, model, loader, device):
        losses = []
        for x, y in loader:
            assert x.is_cuda, "validate must receive batches on the model's device"
            losses.append(F.binary_cross_entropy_with_logits(model(x).squeeze(-1).float(), y, reduction="sum"))
        return {"loss": float(sum(losses)) / len(loader.dataset)}

    def save_best(self, model, metrics, directory):
        save_model(directory, model, {"metrics": metrics})


def test_bf16_autocast_training_learns_and_resumes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    data = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).float())
    task = _CudaTask()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    config = dict(epochs=4, batch_size=32, device="cuda", precision="bf16", progress=False, max_steps=12)
    fit(model, torch.optim.AdamW(model.parameters(), lr=1e-2), data, data, task, TrainConfig(**config), tmp_path)
    assert torch.bfloat16 in task.autocast_seen
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    result = fit(model, torch.optim.AdamW(model.parameters(), lr=1e-2), data, data, task,
                 TrainConfig(**{**config, "max_steps": None, "resume": True}), tmp_path)
    history = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.completed and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["val_loss"] < 0.4 < 0.69  # far better than chance
    state, _ = load_model_files(tmp_path / "best")
    assert all(t.device.type == "cpu" for t in state.values())


def test_tiny_vlm_generates_in_4bit_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    directory = save_tiny_gemma3(tmp_path / "tiny", seed=0)
    model = hf.load_pretrained(Gemma3ForConditionalGeneration, directory, quantization="4bit", device="cuda")
    import bitsandbytes as bnb

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and linears[0].weight.quant_type == "nf4" and linears[0].weight.device.type == "cuda"
    processor = hf.load_processor(AutoProcessor, directory)
    processor.tokenizer.padding_side = "left"
    image = Image.fromarray(np.full((28, 28), 90, np.uint8)).convert("RGB")
    chat = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Lungs?"}]}]]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to("cuda", dtype=model.dtype)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = first[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (1, 6) and int(new.max()) < model.config.text_config.vocab_size
    assert torch.equal(first, second)
