"""The Gradio page of ``oxigaf serve``: one loaded pipeline, a photo in, views, a turntable and a zip out.

The Generate button and the API endpoint ``/generate`` are one event: inputs (photo file,
azimuths text, elevation, steps, guidance, ip_weight, seed), outputs (gallery of the views,
turntable GIF, zip of the output folder). Requests run one at a time (the pipeline is not
shared between requests); Gradio's queue shows each waiting page its place in line.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import gradio as gr

from ..errors import InputError, OxigafError
from . import checks, fit3d
from .runs import RunStore

log = logging.getLogger("oxigaf.serve")

INTRO = """# oxigaf
One photo in, consistent novel views out. Upload a photo (a portrait on a plain background works best)
or pick an example, choose the views, and press **Generate**."""


# Gradio writes a type stub (.pyi) beside the module of every Component subclass it sees, so the
# two changes below are made to component instances instead of subclasses.


def photo_input(**kwargs) -> gr.Image:
    """Gradio's image upload, handing the uploaded file's path over unopened, so that the server
    checks the file itself (size, format, pixel count) and names what is wrong with it.

    A request can only name a file that was uploaded to this server: Gradio refuses any other
    path before the handler runs (tests/test_serve.py checks it).
    """
    image = gr.Image(type="filepath", **kwargs)
    preprocess = image.preprocess

    def unopened(payload):
        if payload is None or (payload.url and payload.url.startswith("data:")):
            return preprocess(payload)
        return payload.path

    image.preprocess = unopened
    return image


def unchecked(component):
    """The component's value reaches the handler as sent (Gradio's own range check does not name
    the field): ``checks.number`` checks it and names it."""
    component.preprocess = lambda payload: payload
    return component


def _slider(name: str, label: str, value, step, info: str | None = None) -> gr.Slider:
    low, high, _ = checks.RANGES[name]
    return unchecked(gr.Slider(low, high, value=value, step=step, label=label, info=info))


@contextlib.contextmanager
def _messages(what: str):
    """oxigaf's own errors become the page's message as they are; anything else is a bug: it is
    logged and reported, and the server goes on."""
    try:
        yield
    except OxigafError as exc:
        raise gr.Error(str(exc)) from exc
    except gr.Error:
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise gr.Error(f"{what} failed: {type(exc).__name__}: {exc}") from exc


class Generator:
    """The handler behind Generate and ``/generate``: checks, generates, saves, returns the files."""

    def __init__(self, pipe, store: RunStore, max_upload_bytes: int, max_views: int = checks.MAX_VIEWS):
        self.pipe, self.store = pipe, store
        self.max_upload_bytes, self.max_views = max_upload_bytes, max_views
        self._lock = threading.Lock()

    def __call__(self, photo, azimuths, elevation, steps, guidance, ip_weight, seed, progress=gr.Progress()):
        with _messages("generation"):
            req = checks.request(azimuths, elevation, steps, guidance, ip_weight, seed, self.max_views)
            if photo is None:
                raise InputError("no photo: upload one or pick an example")
            image, notes = checks.open_photo(photo, self.max_upload_bytes)
            for note in notes:
                gr.Warning(note)
            with self._lock:
                run = self._generate(image, req, progress)
        gallery = [(str(p), f"azimuth {a:g}°") for p, a in zip(run.views, req.azimuths, strict=True)]
        return gallery, str(run.turntable), str(run.zip), str(run.output)

    def fit(self, folder, gaussians, iterations, progress=gr.Progress()):
        """The "3D" action: Gaussians fitted to this page's last request's views (``folder``, kept in
        the page's session state, never sent by the browser)."""
        with _messages("the 3D fit"):
            if not folder:
                raise InputError("generate views first: the 3D fit uses this page's last views")
            with self._lock:
                progress(0.0, desc="fitting Gaussians")
                ply = fit3d.fit(folder, gaussians, iterations, self.pipe.backend,
                                step=lambda i, n: progress((i + 1, n), desc="fitting Gaussians", unit="steps"))
        return str(ply), str(ply)

    def _generate(self, image, req: checks.Request, progress):
        total = req.steps
        progress(0.0, desc="conditioning")

        def step(i, timestep, latents):
            progress((i + 1, total), desc="denoising", unit="steps")

        result = self.pipe.generate(image, cameras=req.azimuths, elevation=req.elevation,
                                    num_inference_steps=req.steps, guidance_scale=req.guidance, seed=req.seed,
                                    ip_weight=req.ip_weight, callback=step, progress=False)
        progress(1.0, desc="saving")
        return self.store.write(result)


def build(pipe, store: RunStore, *, max_upload_bytes: int, examples: list[Path] = (), title: str = "oxigaf"):
    """The page (``gr.Blocks``) for ``pipe``; its outputs go to ``store``."""
    generator = Generator(pipe, store, max_upload_bytes)
    with gr.Blocks(title=title, delete_cache=(600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                photo = photo_input(label="photo", sources=["upload", "clipboard"], height=320,
                                    elem_id="photo")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[photo], label="examples")
                views = gr.Slider(1, generator.max_views, value=4, step=1, label="views",
                                  info="evenly spaced around the subject; or type the azimuths below")
                azimuths = gr.Textbox(checks.DEFAULT_AZIMUTHS, label="azimuths (degrees, 0 = the photo's view)")
                elevation = _slider("elevation", "elevation (degrees)", pipe.config.elevation, 1)
                steps = _slider("steps", "denoising steps", pipe.config.num_inference_steps, 1)
                guidance = _slider("guidance", "guidance", pipe.config.guidance_scale, 0.5)
                ip_weight = _slider("ip_weight", "identity strength (ip_weight)", pipe.config.ip_weight, 0.05,
                                    info="how strongly the views follow the photo's identity")
                low, high, _ = checks.RANGES["seed"]
                seed = unchecked(gr.Number(pipe.config.seed, label="seed", precision=0, minimum=low, maximum=high))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="views", columns=4, height=320, object_fit="contain",
                                     elem_id="views")
                with gr.Row():
                    spin = gr.Image(label="turntable", type="filepath", interactive=False, height=256,
                                    elem_id="turntable")
                    download = gr.File(label="output folder (zip)", interactive=False, elem_id="download")
                with gr.Accordion("3D: fit Gaussians to the views (oxigaf fit)", open=False):
                    with gr.Row():
                        gaussians = unchecked(gr.Slider(*fit3d.GAUSSIANS, value=2000, step=100, label="Gaussians"))
                        iterations = unchecked(gr.Slider(*fit3d.ITERATIONS, value=300, step=10, label="iterations"))
                    fit_button = gr.Button("Fit 3D Gaussians", elem_id="fit")
                    with gr.Row():
                        model = gr.Model3D(label="3D Gaussians", height=320, elem_id="model3d")
                        ply = gr.File(label="point_cloud.ply", interactive=False, elem_id="ply")
        last = gr.State(None)  # this page's last output folder, for the 3D action
        views.change(lambda n: checks.even_azimuths(n, generator.max_views), views, azimuths,
                     api_visibility="private", queue=False)
        button.click(generator, [photo, azimuths, elevation, steps, guidance, ip_weight, seed],
                     [gallery, spin, download, last], api_name="generate", concurrency_limit=1,
                     concurrency_id="pipeline")
        fit_button.click(generator.fit, [last, gaussians, iterations], [model, ply], api_name="fit",
                         concurrency_limit=1, concurrency_id="pipeline")
    return demo


__all__ = ["Generator", "build", "photo_input", "unchecked"]
