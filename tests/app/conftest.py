"""Tiny runs of every pipeline under one runs/ folder, and one app server on a free loopback port per session."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

PIPELINES = ["pneumonia.app:APP", "cxr_localize.app:APP", "mavl_chexpert.app:APP", "pathology_brats.app:APP",
             "brain3d_report.app:APP"]
CPU = ("--no-progress", "--device", "cpu", "--precision", "fp32")


def tiny_runs(root: Path, pneumonia_run: Path, histology_run: Path, brain_run: Path, iu: Path) -> Path:
    """``root/<pipeline>/run`` for all five, each trained for a moment on its phantom through the real CLI (the
    pneumonia, BraTS-Path and brain3d runs are the session's shared ones, copied)."""
    from common.phantoms.chexpert import write_chexpert
    from cxr_localize import train as localize_train
    from mavl_chexpert import train_image

    data = root.parent / "data"
    shutil.copytree(pneumonia_run, root / "pneumonia" / "run")
    assert localize_train.main(["--data-root", str(iu), "--encoder-weights", "none", "--encoder", "resnet18",
                                "--decoder-channels", "16", "16", "8", "8", "8", "--image-size", "32", "--epochs", "1",
                                "--batch-size", "4", "--limit", "12", "--text-encoder", "tiny-clip", "--output-dir",
                                str(root / "cxr_localize" / "run"), *CPU]) == 0
    chexpert = data / "CheXpert-v1.0-small"
    write_chexpert(chexpert, n=24, seed=0, size=64)
    assert train_image.main(["--data-root", str(chexpert), "--output-dir", str(root / "mavl_chexpert" / "run"),
                             "--backbone", "vit-tiny", "--epochs", "1", "--batch-size", "16", "--seed", "0", *CPU]) == 0
    shutil.copytree(histology_run, root / "pathology_brats" / "run")
    shutil.copytree(brain_run, root / "brain3d_report" / "run")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def app_runs(tmp_path_factory, trained_pneumonia_run, histology_run, brain_tiny_runs, small_iu) -> Path:
    return tiny_runs(tmp_path_factory.mktemp("app") / "runs", trained_pneumonia_run[0], histology_run[0],
                     brain_tiny_runs["r2"], small_iu)


@pytest.fixture(scope="session")
def app_server(app_runs, tmp_path_factory):
    """(url, session): the page of ``common.app`` on 127.0.0.1 at a free port, closed at the end."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from common.app import Session, build, discover, launch

    session = Session(discover(PIPELINES), app_runs, "cpu", work=tmp_path_factory.mktemp("app_work"))
    brain = session.predictor("brain3d_report", session.runs("brain3d_report")[0])
    brain.explain_samples, brain.supervoxels = 8, 16  # a tiny LIME when a test types a phrase
    page = build(session)
    port = free_port()
    launch(page, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url, session
    page.close()
