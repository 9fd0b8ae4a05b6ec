"""A web page for your own files: one tab per pipeline, each calling that pipeline's ``predict`` code.

Example:
    python -m common.app --runs runs/demo                       # http://127.0.0.1:7860 (make app)
    python -m common.app --runs runs/ --port 8080 --pipelines mypackage.app:APP   # only the tabs named

Pipelines declare themselves: each has an ``AppSpec`` (``<package>/app.py``: ``APP``) listed in the
``medvl.pipelines`` entry-point group of ``pyproject.toml``; this module reads that group (from the installed
distribution, else from the ``pyproject.toml`` of the checkout it sits in) or the ``--pipelines`` list, and never
names a pipeline itself. A tab offers the runs of its pipeline found under ``--runs`` (any ``best/model.json`` whose
``pipeline`` is the tab's), takes an upload (and a text where the pipeline reads one), runs
``common.predict.run_predictions`` with the pipeline's own ``Predictor`` into a fresh folder, and shows: the
probabilities as bars, the figures (overlay, mask, Grad-CAM, slices) beside the input, the text results, for a
volume three orthogonal slices with a slider, and the result files to download. A file that cannot be read is one
line on the page (``error: <file>: <problem>``); the server keeps serving.

Offline: no analytics (``GRADIO_ANALYTICS_ENABLED=False``), system fonts instead of Google Fonts, no share link, and
it listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import MedvlArgumentParser
from common.errors import ConfigError, DataError, MedvlError, cli_entry
from common.pipelines import discover as discover_pipelines
from common.pipelines import entry_point_values, load_declared
from common.runs import read_run_record

GROUP = "medvl.pipelines"
TEXT_FIELDS = ("label", "class", "report", "caption", "side", "named_side", "note", "threshold")


@dataclass(frozen=True)
class AppSpec:
    """What a pipeline tells the app: ``predictor(run_dir, device)`` builds the object its ``predict`` uses."""

    name: str  # the pipeline (``model.json``'s ``pipeline``)
    title: str
    input: str  # "picture" (image/DICOM file) or "volume" (NIfTI file or DICOM slices)
    predictor: Callable[[Path, str], Any]
    text: str | None = None  # label of a text box, where the pipeline reads a text with the image
    text_required: bool = False
    description: str = ""
    file_types: tuple[str, ...] = field(default=(".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"))


# --- discovery -----------------------------------------------------------------------------------------------------

def _load(value: str) -> AppSpec:
    return load_declared(value, AppSpec, "APP", "--pipelines")


def declared(pyproject: Path | None = None) -> list[str]:
    """The AppSpecs to show, sorted by pipeline name (the tabs' order whichever way they are found): the ``app`` of
    every declared pipeline (``common.pipelines.discover``) and the ``medvl.pipelines`` entry points (the installed
    ones, else those of this checkout's ``pyproject.toml``)."""
    values = {p.name: p.app for p in discover_pipelines() if p.app}
    values.update({v.partition(".")[0]: v for v in entry_point_values(GROUP, pyproject)})
    return [values[name] for name in sorted(values)]


def discover(names: Sequence[str] | None = None) -> list[AppSpec]:
    """The AppSpecs of ``names`` (``module:attr``, or a module holding ``APP``), else of the declared group."""
    values = list(names) if names else declared()
    if not values:
        raise ConfigError("--pipelines", f"no pipelines declared in the {GROUP!r} entry points; name them here")
    return [_load(v if ":" in v else f"{v}:APP") for v in values]


def find_runs(root: Path, pipeline: str) -> list[Path]:
    """Run folders under ``root`` whose ``best/model.json`` belongs to ``pipeline`` (sorted)."""
    runs = []
    for meta in sorted(Path(root).rglob("best/model.json")):
        try:
            read_run_record(meta.parent.parent, pipeline)
        except DataError:  # another pipeline's run, or not a readable one
            continue
        runs.append(meta.parent.parent)
    return runs


# --- prediction ----------------------------------------------------------------------------------------------------

class Session:
    """Predictors built once per (pipeline, run) and kept; one prediction at a time per predictor."""

    def __init__(self, specs: Sequence[AppSpec], runs_root: Path, device: str = "auto", work: Path | None = None):
        self.specs = {s.name: s for s in specs}
        self.runs_root, self.device = Path(runs_root), device
        self.work = Path(work or tempfile.mkdtemp(prefix="medvl-app-"))
        self._predictors: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._count = 0

    def runs(self, name: str) -> list[str]:
        return [str(p) for p in find_runs(self.runs_root, name)]

    def predictor(self, name: str, run: str):
        key = (name, str(run))
        with self._lock:
            if key not in self._predictors:
                self._predictors[key] = self.specs[name].predictor(Path(run), self.device)
            return self._predictors[key]

    def predict(self, name: str, run: str | None, files: Sequence[str], text: str | None = None
                ) -> tuple[dict[str, Any], Path]:
        """(the row ``predict`` writes, its output folder); ``MedvlError`` for anything the user can fix."""
        from common.predict import CSV, run_predictions

        spec = self.specs[name]
        run = run or next(iter(self.runs(name)), None)  # the first run found (the demo's under runs/demo)
        if not run:
            raise ConfigError("run", f"no {name} run found under {self.runs_root}; train one or run `make demo`")
        if not files:
            raise DataError(Path("upload"), "no file uploaded")
        if spec.text_required and not (text or "").strip():
            raise DataError(Path("report"), "the report text is empty")
        with self._lock:
            self._count += 1
            job = self.work / f"{self._count:05d}-{name}"
        source = _inputs(files, job / "in", spec.input)
        predictor = self.predictor(name, run)
        out = job / "out"
        with _locked(predictor):
            run_predictions(Path(run), source, out, spec.input, lambda: predictor,
                            text_for=(lambda _: text) if (text or "").strip() else None)
        rows = json.loads((out / "predictions.json").read_text())
        row = rows[0]
        if "error" in row:
            raise DataError(Path(row["file"]).name, row["error"])
        row["_files"] = [str(out / CSV), str(out / "predictions.json"),
                         *sorted(str(p) for p in (out / "figures").rglob("*.png"))]
        return row, out


def _locked(predictor):
    lock = getattr(predictor, "_app_lock", None)
    if lock is None:
        lock = threading.Lock()
        try:
            predictor._app_lock = lock
        except AttributeError:
            pass
    return lock


def _inputs(files: Sequence[str], folder: Path, kind: str) -> Path:
    """Uploaded files copied under their own names; several DICOM slices for a volume become one series folder."""
    folder.mkdir(parents=True)
    copies = []
    for f in files:
        name = Path(f).name
        copies.append(Path(shutil.copy(f, folder / name)))
    if len(copies) == 1:
        return copies[0]
    if kind == "volume":  # a DICOM series uploaded slice by slice
        series = folder / "series"
        series.mkdir()
        for c in copies:
            c.rename(series / c.name)
        return series
    raise DataError(Path("upload"), f"upload one file at a time ({len(copies)} were given)")


def probabilities(row: dict[str, Any]) -> dict[str, float]:
    """``prob_<name>`` columns as {name: p}; a single probability gets its complement beside it."""
    probs = {k[5:]: float(v) for k, v in row.items() if k.startswith("prob_") and isinstance(v, int | float)}
    if len(probs) == 1:
        (name, p), = probs.items()
        probs[f"not {name}"] = 1.0 - p
    return probs


def summary(row: dict[str, Any]) -> str:
    """The row's readable results as Markdown (text fields first, then the other scalars, figures left out)."""
    lines = []
    for key in TEXT_FIELDS:
        if key in row and row[key] not in ("", None):
            lines.append(f"**{key}**: {row[key]}")
    for key, value in row.items():
        if key in TEXT_FIELDS or key.startswith(("prob_", "_")) or key == "file":
            continue
        if isinstance(value, str) and value.endswith((".png", ".nii.gz", ".nii")):
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        lines.append(f"**{key}**: {value}")
    return "  \n".join(lines)


def figures(row: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v, k) for k, v in row.items() if isinstance(v, str) and v.endswith(".png") and Path(v).is_file()]


def volume_of(row: dict[str, Any], fallback: str) -> dict[str, Any] | None:
    """What the slice slider shows for a row: the volume it was predicted from (the NIfTI ``predict`` read, or the
    upload) as ``data``/``affine``, and the row's ``overlay`` NIfTI (a map in world coordinates, e.g. a LIME heat
    map on the model's grid) as ``overlay``/``overlay_affine`` when there is one."""
    from common.reader import read_volume

    shown = None
    for candidate in (row.get("volume"), fallback):
        if candidate:
            try:
                volume = read_volume(candidate)
            except (MedvlError, OSError, ValueError):
                continue
            shown = {"data": np.asarray(volume.data, dtype=np.float32), "affine": volume.affine}
            break
    if shown is not None and isinstance(row.get("overlay"), str):
        try:
            overlay = read_volume(row["overlay"])
            shown.update(overlay=np.nan_to_num(np.asarray(overlay.data, dtype=np.float32)),
                         overlay_affine=overlay.affine)
        except (MedvlError, OSError, ValueError):
            pass
    return shown


def _overlay_plane(shape: Sequence[int], axis: int, index: int, affine: np.ndarray, overlay: np.ndarray,
                   overlay_affine: np.ndarray) -> np.ndarray:
    """The overlay sampled (nearest voxel, through world coordinates) on the plane ``index`` of ``axis`` of a
    volume of ``shape`` placed by ``affine``: an array of the plane's shape, 0 outside the overlay's grid."""
    axes = [np.arange(n) for n in shape]
    axes[axis] = np.array([index])
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    mapping = np.linalg.inv(overlay_affine) @ affine
    voxels = np.rint(grid @ mapping[:3, :3].T + mapping[:3, 3]).astype(np.int64)
    inside = np.all((voxels >= 0) & (voxels < np.array(overlay.shape[:3])), axis=1)
    values = np.zeros(len(grid), dtype=np.float32)
    values[inside] = overlay[tuple(voxels[inside].T)]
    return np.squeeze(values.reshape([len(a) for a in axes]), axis=axis)


def orthogonal(volume: np.ndarray | dict[str, Any], fraction: float) -> np.ndarray:
    """Axial | coronal | sagittal slices at ``fraction`` (0..1) of each axis, side by side as one uint8 image.

    ``volume`` is an array, or ``volume_of``'s dict; with an ``overlay`` there the slices are RGB, the overlay's
    positive values red and negative ones blue over the grey (symmetric scale, 0 left clear).
    """
    shown = volume if isinstance(volume, dict) else {"data": volume}
    data = shown["data"]
    x, y, z = data.shape[:3]
    i, j, k = (min(int(round(fraction * (n - 1))), n - 1) for n in (x, y, z))
    planes = [data[:, :, k].T, data[:, j, :].T, data[i, :, :].T]  # RAS voxels: superior up
    low, high = np.percentile(data, [1, 99.5])
    grey = [np.flipud(np.clip((plane - low) / max(high - low, 1e-6), 0, 1)) for plane in planes]
    if shown.get("overlay") is not None:
        from matplotlib import colormaps

        heat = [np.flipud(_overlay_plane(data.shape[:3], axis, index, shown["affine"], shown["overlay"],
                                         shown["overlay_affine"]).T) for axis, index in ((2, k), (1, j), (0, i))]
        bound = float(np.abs(shown["overlay"]).max()) or 1.0
        colours = colormaps["bwr"]
        tiles = []
        for g, h in zip(grey, heat):
            alpha = np.where(h != 0, 0.55, 0.0)[..., None]
            tiles.append((1 - alpha) * g[..., None] + alpha * colours(0.5 + 0.5 * h / bound)[..., :3])
        grey = tiles
    height = max(p.shape[0] for p in grey)
    padded = []
    for plane in grey:
        pad = height - plane.shape[0]
        widths = ((pad // 2, pad - pad // 2), (0, 2)) + (((0, 0),) if plane.ndim == 3 else ())
        padded.append(np.pad(plane, widths, constant_values=0))
    return (np.hstack(padded) * 255).astype(np.uint8)


def one_line(err: BaseException, work: Path | None = None) -> str:
    """``error: <file>: <problem>`` on one line; an upload is named by its own name, not the server's copy."""
    if isinstance(err, MedvlError):
        source = err.source
        if work is not None and source.startswith(str(work)):
            source = Path(source).name
        text = f"error: {source}: {err.message}"
    else:
        text = f"error: {type(err).__name__}: {err}"
    return " ".join(text.split())


# --- the page ------------------------------------------------------------------------------------------------------

def build(session: Session):
    """The Gradio Blocks: one tab per pipeline."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    with gr.Blocks(title="medvl", analytics_enabled=False) as page:
        gr.Markdown("# medvl: your own images\nEach tab runs a pipeline's `predict` on an upload with a trained run.")
        for spec in session.specs.values():
            with gr.Tab(spec.title, id=spec.name):
                _tab(gr, session, spec)
    return page


def _tab(gr, session: Session, spec: AppSpec) -> None:
    if spec.description:
        gr.Markdown(spec.description)
    runs = session.runs(spec.name)
    with gr.Row():
        with gr.Column(scale=1):
            run = gr.Dropdown(runs, value=runs[0] if runs else None, label="run", allow_custom_value=True,
                              elem_id=f"{spec.name}-run")
            upload = gr.File(label="NIfTI file or DICOM slices" if spec.input == "volume" else "image or DICOM file",
                             file_count="multiple" if spec.input == "volume" else "single",
                             elem_id=f"{spec.name}-upload")
            text = gr.Textbox(label=spec.text, lines=3, elem_id=f"{spec.name}-text", visible=spec.text is not None)
            button = gr.Button("Predict", variant="primary", elem_id=f"{spec.name}-predict")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id=f"{spec.name}-status")
            label = gr.Label(label="probabilities", num_top_classes=10, visible=False,
                             elem_id=f"{spec.name}-probs")  # shown when there are some
            result = gr.Markdown(elem_id=f"{spec.name}-result")
            gallery = gr.Gallery(label="figures", columns=2, height=360, object_fit="contain", preview=False)
            if spec.input == "volume":
                slider = gr.Slider(0, 100, value=50, step=1, label="slice (% along each axis)")
                slices = gr.Image(label="axial | coronal | sagittal (the explanation's map over it when asked)",
                                  type="numpy", elem_id=f"{spec.name}-slices")
            downloads = gr.File(label="result files", file_count="multiple", interactive=False)
    volume = gr.State(None)

    def run_one(run_dir, files, report):
        files = [files] if isinstance(files, str) else [f if isinstance(f, str) else f.name for f in (files or [])]
        empty = ("", [], None, None, None)
        try:
            row, _ = session.predict(spec.name, run_dir, files, report if spec.text else None)
        except Exception as err:  # one line on the page, whatever went wrong; the server keeps serving
            return (one_line(err, session.work), None, *empty)
        shown = None
        data = volume_of(row, files[0]) if spec.input == "volume" else None
        if data is not None:
            shown = orthogonal(data, 0.5)
        done = f"done: {Path(row['file']).name}"
        return done, probabilities(row) or None, summary(row), figures(row), row["_files"], data, shown

    outputs = [status, label, result, gallery, downloads, volume]
    if spec.input == "volume":
        event = button.click(run_one, [run, upload, text], [*outputs, slices], api_name=f"predict_{spec.name}")
        slider.change(lambda data, pct: None if data is None else orthogonal(data, pct / 100), [volume, slider],
                      slices, api_name=f"slices_{spec.name}")
    else:
        event = button.click(lambda *a: run_one(*a)[:-1], [run, upload, text], outputs,
                             api_name=f"predict_{spec.name}")
    # The probabilities panel only when the result has some (a mask or a report has none); a separate step, so the
    # endpoint's answer stays plain values for gradio_client.
    event.then(lambda probs: gr.update(visible=bool(probs)), label, label, api_visibility="private")


def launch(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no Google Fonts: works offline
    return page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       show_error=False, theme=theme, inbrowser=False, quiet=not block)


# --- command line --------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = MedvlArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/demo"), help="folder searched for trained runs")
    parser.add_argument("--host", default="127.0.0.1", help="address the web server listens on")
    parser.add_argument("--port", type=int, default=7860, help="port the web server listens on")
    parser.add_argument("--device", default="auto", help="device the models run on: auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--pipelines", nargs="+", default=None,
                        help=f"AppSpecs as module:attr (default: the {GROUP!r} entry points)")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.runs.is_dir():
        raise ConfigError("--runs", f"{args.runs} is not a folder (run `make demo` first)")
    session = Session(discover(args.pipelines), args.runs, args.device)
    print(f"medvl app: {', '.join(session.specs)} on http://{args.host}:{args.port} (runs under {args.runs})")
    launch(build(session), args.host, args.port)
    return 0


__all__ = ["AppSpec", "GROUP", "Session", "build", "declared", "discover", "find_runs", "launch", "main",
           "orthogonal", "probabilities", "summary"]

if __name__ == "__main__":
    raise SystemExit(main())
