"""The Gradio page: layout and event wiring only; the logic lives in ``octsam.app.session`` and ``loading``.

Every event goes through ``_guarded``: an ``OctSamError`` (or any unexpected exception) becomes a message in the
page and a ``gr.Warning`` toast, never a stack trace, and the page keeps working. Named API endpoints (``/open``,
``/goto``, ``/segment``, ``/apply``, ``/undo``, ``/clear``, ``/export``, ``/adapter``) let ``gradio_client`` drive
the same code the clicks do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from octsam.app.loading import open_uploads
from octsam.app.session import TOOLS, Scan, Session
from octsam.colors import class_color
from octsam.errors import OctSamError
from octsam.export.runtime import load_segmenter
from octsam.segmenter import Segmenter
from octsam.textsafe import html_text

logger = logging.getLogger("octsam.app")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class AppConfig:
    adapters: dict[str, Segmenter]  # name shown in the page -> loaded segmenter (the first is the default)
    export_root: Path
    initial_scans: list[Scan] = field(default_factory=list)
    initial_volumes: list = field(default_factory=list)  # VolumeInfo of initial_scans that came from volumes
    auto_segment: bool = False  # segment each B-scan (automatic adapters) when it is first shown
    initial_message: str = ""
    dataset_labels: list[str] | None = None  # labels of the --dataset opened at start
    device: str = "auto"
    engine: str = "torch"  # torch | onnxruntime: how an adapter chosen in the page (a Hub id) is run
    upload_root: Path | None = None  # where Gradio writes uploads (default: its temp folder)

    @property
    def default_adapter(self) -> str:
        return next(iter(self.adapters))


def legend_html(labels: list[str]) -> str:
    items = "".join(
        f'<span class="octsam-legend-item" style="display:inline-flex;align-items:center;margin-right:14px">'
        f'<span style="display:inline-block;width:14px;height:14px;margin-right:5px;border:1px solid #333;'
        f'background:rgb{class_color(i, labels)}"></span>{html_text(name)}</span>'
        for i, name in enumerate(labels)
        if i > 0
    )
    return f'<div id="octsam-legend-items">{items}</div>'


def timing_text(session: Session) -> str:
    t = session.timings
    parts = []
    if "click_s" in t:
        parts.append(f"last click {1000 * t['click_s']:.0f} ms (prompt from the cached embedding)")
    if "segment_s" in t:
        parts.append(f"last segmentation {1000 * t['segment_s']:.0f} ms")
    if "encode_s" in t:
        parts.append(f"last image encoding {1000 * t['encode_s']:.0f} ms")
    return " · ".join(parts) or "no timing yet"


def parse_spacing(sy, sx) -> tuple[float, float] | None:
    if sy in (None, "", 0) and sx in (None, "", 0):
        return None
    try:
        y, x = float(sy), float(sx)
    except (TypeError, ValueError) as err:
        raise OctSamError("Pixel spacing: give both the axial and the lateral size in mm per pixel.") from err
    if not (y > 0 and x > 0 and np.isfinite(y) and np.isfinite(x)):
        raise OctSamError("Pixel spacing must be two positive numbers (mm per pixel).")
    return y, x


def click_position(index) -> tuple[object, object]:
    """The (x, y) of a click on the B-scan view (Gradio's ``SelectData.index``), or (None, None) when there is
    none; anything else (a number, one value) is a message, not an exception."""
    if index is None:
        return None, None
    if not isinstance(index, (list, tuple)) or len(index) < 2:
        raise OctSamError(f"The click position {index!r} is not a point (x, y) on the B-scan; click on the B-scan.")
    return index[0], index[1]


def build_app(config: AppConfig) -> gr.Blocks:
    """The Gradio page. Long on purpose: a ``gr.Blocks`` page is declared inside one ``with`` block, and each event
    handler is wired to components created in that same scope; every handler is a thin call into ``Session``
    (octsam/app/session.py), where the logic lives and is tested without a browser."""
    upload_root = Path(config.upload_root or gr.utils.get_upload_folder())
    segmenters = dict(config.adapters)

    def new_session() -> Session:
        session = Session(segmenters[config.default_adapter])
        if config.initial_scans:
            volumes = [dataclasses.replace(v) for v in config.initial_volumes]
            session.add_scans(list(config.initial_scans), volumes)
        return session

    def auto_segment(session: Session) -> str:
        if not (config.auto_segment and session.scans and session.current not in session.masks):
            return ""
        if session.segmenter.config.mode == "prompted":
            return ""
        session.segment()
        return f"segmented in {1000 * session.timings['segment_s']:.0f} ms"

    def class_choices(session: Session):
        return [(f"{k} {n}", k) for k, n in enumerate(session.labels) if k > 0]

    def view_values(session: Session, message: str, visible=None, opacity=0.45, spacing=None):
        """The B-scan overlay, the status line, the area rows and the localiser view of a session."""
        if not session.scans:
            return None, message, [], None
        image = session.render(visible, 0.45 if opacity is None else opacity)
        rows = [
            [
                r["class"],
                r["area_px"],
                None if r["area_mm2"] is None else float(f"{r['area_mm2']:.4g}"),
                r["components"],
            ]
            for r in session.areas(spacing)
        ]
        where = f"B-scan {session.current + 1}/{len(session.scans)}: {session.scan.name}"
        measures = session.volume_measures(spacing)
        if measures:
            message = f"{message}. {measures}" if message else measures
        return image, f"{where}. {message}" if message else where, rows, session.localizer_view()

    # Scans opened at start are segmented once (with --auto-segment) and shown in the page's first paint.
    template = new_session()
    first_message = ". ".join(m for m in (config.initial_message, auto_segment(template)) if m)
    first_image, first_status, first_rows, first_loc = view_values(template, first_message)

    def new_session_from_template() -> Session:
        session = new_session()
        session.masks = dict(template.masks)  # arrays are replaced, never edited in place: sharing is safe
        session.timings = dict(template.timings)
        session.embeddings.update(template.embeddings)  # tensors are only read: the first click needs no encoding
        return session

    first_labels = segmenters[config.default_adapter].labels
    first_choices = [(f"{k} {n}", k) for k, n in enumerate(first_labels) if k > 0]

    with gr.Blocks(title="octsam: OCT biomarker segmentation") as demo:
        state = gr.State(None)
        gr.Markdown("## octsam · view, prompt, correct and export OCT biomarker masks")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                adapter = gr.Dropdown(
                    choices=list(segmenters),
                    value=config.default_adapter,
                    allow_custom_value=True,
                    label="Adapter (a name started with the app, or a Hub id ORG/NAME)",
                )
                files = gr.File(label="Open B-scans or volumes", file_count="multiple", type="filepath")
                folder = gr.File(label="Open a folder", file_count="directory", type="filepath")
                scan_slider = gr.Slider(
                    0, max(len(template.scans) - 1, 1), value=0, step=1, label="B-scan", elem_id="octsam-slider"
                )
                localizer = gr.Image(
                    first_loc,
                    label="Localiser",
                    interactive=False,
                    format="png",
                    height=220,
                    visible=first_loc is not None,
                )
                with gr.Row():
                    spacing_y = gr.Number(label="axial mm/px (0: unknown)", value=None, minimum=0)
                    spacing_x = gr.Number(label="lateral mm/px (0: unknown)", value=None, minimum=0)
                export_btn = gr.Button("Export corrected masks", variant="secondary")
                export_path = gr.Textbox(label="Export", interactive=False, elem_id="octsam-export")
                export_file = gr.File(label="Download export", interactive=False)
            with gr.Column(scale=3):
                view = gr.Image(
                    label="B-scan (click to prompt / paint)",
                    interactive=False,
                    format="png",
                    elem_id="octsam-view",
                    value=first_image,
                    buttons=["download", "fullscreen"],
                )
                legend = gr.HTML(legend_html(first_labels), elem_id="octsam-legend")
                status = gr.Textbox(
                    first_status, label="Messages", interactive=False, lines=2, elem_id="octsam-status"
                )
                timing = gr.Markdown(timing_text(template), elem_id="octsam-timing")
            with gr.Column(scale=1, min_width=260):
                with gr.Row():
                    segment_btn = gr.Button("Segment", variant="primary", elem_id="octsam-segment")
                    segment_all_btn = gr.Button("Segment all")
                tool = gr.Radio(list(TOOLS), value="point +", label="Tool (box: two clicks)")
                klass = gr.Dropdown(choices=first_choices, value=1, label="Class", elem_id="octsam-class")
                radius = gr.Slider(1, 60, value=6, step=1, label="Brush / eraser radius (px)")
                with gr.Row():
                    undo_btn = gr.Button("Undo")
                    clear_btn = gr.Button("Clear prompts")
                visible = gr.CheckboxGroup(
                    choices=first_choices, value=[c[1] for c in first_choices], label="Show classes"
                )
                opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Opacity")
                areas = gr.Dataframe(
                    first_rows or None,
                    headers=["class", "area_px", "area_mm2", "components"],
                    label="Areas",
                    interactive=False,
                )
                click_x = gr.Number(visible=False, label="x")
                click_y = gr.Number(visible=False, label="y")
                apply_btn = gr.Button(visible=False)

        view_inputs = [visible, opacity, spacing_y, spacing_x]
        outputs = [state, view, status, timing, areas, localizer, scan_slider, legend, klass, visible]

        def refresh(session: Session, message: str, vis, opac, sy, sx, reset_classes: bool = False):
            warn = ""
            try:
                spacing = parse_spacing(sy, sx)
            except OctSamError as err:
                spacing, warn = None, f" ⚠ {err}"
            vis_ids = None if vis is None or reset_classes else [int(v) for v in vis]
            image, message, rows, loc = view_values(session, message, vis_ids, opac, spacing)
            choices = class_choices(session)
            ids = [c[1] for c in choices]
            return (
                session,
                image,
                message + warn,
                timing_text(session),
                rows,
                gr.Image(value=loc, visible=loc is not None),
                gr.Slider(minimum=0, maximum=max(len(session.scans) - 1, 1), value=session.current),
                legend_html(session.labels),
                gr.Dropdown(choices=choices, value=ids[0]) if reset_classes else gr.skip(),
                gr.CheckboxGroup(choices=choices, value=ids) if reset_classes else gr.skip(),
            )

        def guarded(action, reset_classes: bool = False):
            """Wrap ``action(session, *args) -> message`` into an event handler that never raises."""

            def handler(state_value, *args):
                *own, vis, opac, sy, sx = args
                session = state_value if isinstance(state_value, Session) else new_session_from_template()
                try:
                    message = action(session, *own) or ""
                    message = ". ".join(m for m in (message, auto_segment(session)) if m)
                except OctSamError as err:
                    message = f"⚠ {err}"
                    gr.Warning(str(err))
                except Exception as err:  # the page must survive anything
                    logger.exception("octsam app: unexpected error")
                    message = f"⚠ unexpected error ({type(err).__name__}): {err}"
                    gr.Warning(message)
                try:
                    return refresh(session, message, vis, opac, sy, sx, reset_classes or state_value is None)
                except Exception as err:
                    logger.exception("octsam app: cannot render")
                    gr.Warning(f"cannot show the B-scan: {err}")
                    return (session, None, f"⚠ cannot show the B-scan ({type(err).__name__}: {err})") + (
                        gr.skip(),
                    ) * 7

            return handler

        # ------------------------------------------------------------------------------------------------ actions
        def do_open(session: Session, paths):
            scans, infos, problems = open_uploads(paths or [], upload_root)
            if scans:
                session.add_scans(scans, infos)
            parts = []
            if scans:
                parts.append(f"opened {len(scans)} B-scan(s)" + (f" from {len(infos)} volume(s)" if infos else ""))
            if problems:
                shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
                gr.Warning(shown)
                parts.append(f"⚠ {len(problems)} file(s) not opened: {shown}")
            if not scans and not problems:
                parts.append("no file was given")
            return ". ".join(parts)

        def do_goto(session: Session, index):
            if session.scans:
                session.go_to(int(index or 0))
            return ""

        def do_segment(session: Session):
            session.scan  # noqa: B018 - raises the 'open a B-scan first' message
            session.segment()
            return f"segmented in {1000 * session.timings['segment_s']:.0f} ms"

        def do_segment_all(session: Session):
            session.scan  # noqa: B018
            n = session.segment_all()
            return f"segmented {n} B-scan(s) without a mask"

        def do_apply(session: Session, tool_name, label, x, y, rad):
            session.scan  # noqa: B018
            if label is None:
                raise OctSamError("Choose a class first.")
            if x is None or y is None:
                raise OctSamError("No click position was given.")
            try:
                x, y = float(x), float(y)
            except (TypeError, ValueError):
                raise OctSamError(f"The click position ({x!r}, {y!r}) is not a point on the B-scan.") from None
            return session.click(tool_name, int(label), x, y, int(rad or 1))

        def do_select(session: Session, tool_name, label, index, rad):
            x, y = click_position(index)
            return do_apply(session, tool_name, label, x, y, rad)

        def do_undo(session: Session):
            return "undone" if session.undo() else "nothing to undo on this B-scan"

        def do_clear(session: Session):
            session.scan  # noqa: B018
            session.clear_prompts()
            return "prompts cleared (the mask stays; undo brings the prompts back)"

        def do_adapter(session: Session, name):
            name = (name or "").strip()
            if name not in segmenters:
                # Only Hub ids are loaded from the page: a path typed in the browser is never read.
                if not _REPO_ID.match(name) or ".." in name or os.path.exists(name):
                    raise OctSamError(
                        f"Adapter {name!r}: choose one the app was started with, or give a Hub repo id ORG/NAME."
                    )
                segmenters[name] = load_segmenter(config.engine, name, device=config.device)
            labels = segmenters[name].labels
            if config.dataset_labels is not None and labels != config.dataset_labels:
                raise OctSamError(
                    f"Adapter {name} has labels {', '.join(labels)} but the open dataset has "
                    f"{', '.join(config.dataset_labels)}; choose an adapter trained on these labels."
                )
            session.segmenter = segmenters[name]
            session.masks, session.prompts, session.undo_stack = {}, {}, {}
            session.embeddings.clear()
            return f"adapter {name}: {session.segmenter.config.mode} mode, labels {', '.join(session.labels)}"

        def export_handler(state_value, sy, sx):
            session = state_value if isinstance(state_value, Session) else new_session_from_template()
            try:
                out = session.export(config.export_root, parse_spacing(sy, sx))
                # The zip goes to a temporary folder that Gradio serves once; the export folder itself is never
                # served (no allowed_paths), so --share does not expose earlier exports.
                archive = shutil.make_archive(
                    str(Path(tempfile.mkdtemp(prefix="octsam-export-")) / out.name), "zip", out
                )
                return session, str(out), archive
            except OctSamError as err:
                gr.Warning(str(err))
                return session, f"⚠ {err}", None
            except Exception as err:
                logger.exception("octsam app: export failed")
                gr.Warning(f"export failed: {err}")
                return session, f"⚠ export failed ({type(err).__name__}: {err})", None

        def on_select(state_value, tool_name, label, rad, vis, opac, sy, sx, evt: gr.SelectData):
            index = getattr(evt, "index", None)  # checked inside the guard: an odd index is a message
            return guarded(do_select)(state_value, tool_name, label, index, rad, vis, opac, sy, sx)

        # ------------------------------------------------------------------------------------------------ wiring
        # No load event: the first paint shows the initial B-scan; a session is made on the first action.
        files.upload(guarded(do_open), [state, files, *view_inputs], outputs, api_name="open")
        folder.upload(guarded(do_open), [state, folder, *view_inputs], outputs, api_name="open_folder")
        scan_slider.input(guarded(do_goto), [state, scan_slider, *view_inputs], outputs, api_name="goto")
        segment_btn.click(guarded(do_segment), [state, *view_inputs], outputs, api_name="segment")
        segment_all_btn.click(guarded(do_segment_all), [state, *view_inputs], outputs, api_name="segment_all")
        view.select(on_select, [state, tool, klass, radius, *view_inputs], outputs, api_name=False)
        apply_btn.click(
            guarded(do_apply), [state, tool, klass, click_x, click_y, radius, *view_inputs], outputs, api_name="apply"
        )
        undo_btn.click(guarded(do_undo), [state, *view_inputs], outputs, api_name="undo")
        clear_btn.click(guarded(do_clear), [state, *view_inputs], outputs, api_name="clear")
        adapter.change(
            guarded(do_adapter, reset_classes=True), [state, adapter, *view_inputs], outputs, api_name="adapter"
        )
        redraw = guarded(lambda s: "")
        for comp in (visible, opacity, spacing_y, spacing_x):
            comp.change(redraw, [state, *view_inputs], outputs, api_name=False)
        export_btn.click(
            export_handler, [state, spacing_y, spacing_x], [state, export_path, export_file], api_name="export"
        )
    return demo
