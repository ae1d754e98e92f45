"""`mfrae app`: a local web page that generates images in one step with a MeanFlow checkpoint.

    mfrae app --ckpt runs/demo/mfd [--port 7860] [--host 127.0.0.1] [--share no] [--device cpu]

The page (Gradio, the optional extra `mfrae[app]`, imported only when the command runs):

  * Generate: a class (the digits' names "0".."9", ImageNet's names for a 1000-class model, else "class N"), a
    seed (and a "new seed" button), a number of images and the student's steps (1, 2 or N). Image i of seed s
    starts from the noise of sample i of `mfrae sample --seed s` (`mfrae.generation.sample_noise`), so the same
    seed gives the same images and another seed other ones.
  * Beside it the run's flow-matching teacher (the `teacher` of the student's run config, or `--teacher`) at its
    many-step setting (its run's first `eval.teacher_steps`, else 32 Euler evaluations), from the same noise and
    class, so both timings and the speed-up are on the page.
  * Each result shows the seconds it took (sampling and decoding, measured on the server) and the GFLOPs per
    image: NFE x the backbone's plus the decoder's, counted once at start on the loaded models with
    `mfrae.flops.count_true_flops` (every matrix product, attention included, 2 FLOPs per multiply-add).
  * Interpolate: a strip of 1-step images along the spherical interpolation (slerp) between the noises of
    image 0 of two seeds, same class.

The models load once, before the page is served, and stay in memory; the event handlers are closures over them.
Bad input on the page (an unknown class, steps < 1, more than `MAX_IMAGES` images, a seed that is no integer)
is reported there as an error message (gr.Error); the server keeps running. A bad `--ckpt` (or `--decoder`,
`--stats`, `--teacher`) stops the command with the CLI's one-line error, before anything is served.
The event handlers are also an API: `gradio_client.Client(url).predict(..., api_name="/generate")` and
`api_name="/interpolate"` (see docs/app.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mfrae.flops import count_true_flops
from mfrae.generation import SampleSettings, generate_batch, sample_noise
from mfrae.images import to_uint8_nhwc
from mfrae.models.dit_dh import DiTDH
from mfrae.sample import MAX_SEED, Models, load_backbone, load_models
from mfrae.train.runs import run_config

if TYPE_CHECKING:
    import gradio as gr

MAX_IMAGES = 64  # per request: keeps one click within seconds on a CPU and the page light
MAX_STEPS = 1000  # student steps or teacher evaluations per request
DEFAULT_TEACHER_STEPS = 32  # the training config's default eval.teacher_steps
INSTALL_HINT = "pip install 'mfrae[app]'"


#################################################################################
#                        The models and their generation                        #
#################################################################################


@dataclass
class Teacher:
    model: DiTDH
    spec: str  # what was loaded, as named by the run config or --teacher
    steps: int  # the default many-step setting (Euler evaluations)
    shift: float | None  # the teacher run's training shift, when known
    backbone_flops: int  # one forward on one latent


@dataclass
class Result:
    images: np.ndarray  # uint8 [N, H, W, 3]
    seconds: float
    nfe: int
    gflops_per_image: float


class Generator:
    """The loaded student (and teacher) and the page's operations on them; input errors raise ValueError."""

    def __init__(self, models: Models, teacher: Teacher | None, names: list[str], device: torch.device) -> None:
        self.models, self.teacher, self.class_names, self.device = models, teacher, names, device
        self.student = models.model
        self.latent_shape = self.student.latent_shape
        # Cost per image, counted once on the loaded models with a single latent (batch size does not change it).
        self.student_flops = _backbone_flops(self.student, device)
        self.decoder_flops = _decoder_flops(models, device)
        # Every generation runs on this one thread: torch's CPU thread pool is set up per calling thread, so in
        # Gradio's many worker threads each one's first call would be slow (and its timing wrong); one thread
        # also keeps requests from competing for the cores.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mfrae-app")

    # -- input checks: one message naming the field --------------------------------------------------------

    def class_id(self, value: Any) -> int:
        """A class name from the list, or its integer id."""
        text = str(value).strip()
        if text in self.class_names:
            return self.class_names.index(text)
        if text.lstrip("-").isdigit() and 0 <= int(text) < len(self.class_names):
            return int(text)
        shown = ", ".join(self.class_names[:10]) + (", ..." if len(self.class_names) > 10 else "")
        raise ValueError(f"unknown class {text!r}: choose one of {shown} (or an id 0..{len(self.class_names) - 1})")

    @staticmethod
    def integer(value: Any, what: str, low: int, high: int) -> int:
        """An integer in [low, high] from a number or text (the page's number fields send floats)."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be an integer, got {value!r}") from None
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"{what} must be an integer, got {value!r}")
        if not low <= number <= high:
            raise ValueError(f"{what} must be in [{low}, {high}], got {int(number)}")
        return int(number)

    # -- generation ----------------------------------------------------------------------------------------

    def student_images(self, label: int, noise: Tensor, steps: int) -> Result:
        settings = SampleSettings(steps=steps, batch_size=len(noise))
        return self._timed(self.student, label, noise, settings, self.student_flops)

    def teacher_images(self, label: int, noise: Tensor, steps: int) -> Result:
        if self.teacher is None:
            raise ValueError("this run has no teacher (pass --teacher to compare with one)")
        settings = SampleSettings(steps=steps, batch_size=len(noise), shift=self.teacher.shift)
        return self._timed(self.teacher.model, label, noise, settings, self.teacher.backbone_flops)

    def noise(self, seed: int, count: int) -> Tensor:
        """The noise of samples 0..count-1 of `seed`, as `mfrae sample --seed seed` draws it."""
        return sample_noise(self.latent_shape, range(count), seed)

    def interpolation_noise(self, seed_a: int, seed_b: int, frames: int) -> Tensor:
        """`frames` noises along the slerp from image 0 of `seed_a` to image 0 of `seed_b`."""
        a, b = self.noise(seed_a, 1)[0], self.noise(seed_b, 1)[0]
        return torch.stack([slerp(a, b, w) for w in torch.linspace(0, 1, frames).tolist()])

    def _timed(self, model: DiTDH, label: int, noise: Tensor, settings: SampleSettings, backbone_flops: int) -> Result:
        labels = torch.full((len(noise),), label, dtype=torch.long)

        def timed_generation() -> tuple[Tensor, float]:
            start = time.perf_counter()
            # generate_batch returns CPU tensors, so the time includes the device's work (it synchronises).
            images = generate_batch(model, self.models.rae, labels, range(len(noise)), settings, device=self.device,
                                    noise=noise, check_finite=True)
            return images, time.perf_counter() - start

        images, seconds = self._worker.submit(timed_generation).result()
        gflops = (settings.steps * backbone_flops + self.decoder_flops) * 1e-9
        return Result(to_uint8_nhwc(images), seconds, settings.steps, gflops)


def slerp(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """Spherical interpolation between two noises (Gaussian noise keeps its norm, a straight line would shrink it)."""
    cos = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
    angle = torch.arccos(cos.clamp(-1, 1))
    if angle.abs() < 1e-4:  # (nearly) the same noise: the straight line is exact enough
        return (1 - weight) * a + weight * b
    return (torch.sin((1 - weight) * angle) * a + torch.sin(weight * angle) * b) / torch.sin(angle)


def _backbone_flops(model: DiTDH, device: torch.device) -> int:
    x = torch.zeros(1, *model.latent_shape, device=device)
    t, y = torch.ones(1, device=device), torch.zeros(1, dtype=torch.long, device=device)
    r = (torch.zeros(1, device=device),) if model.is_meanflow else ()
    return count_true_flops(model, x, t, y, *r)


def _decoder_flops(models: Models, device: torch.device) -> int:
    channels, height, width = models.model.latent_shape
    tokens = torch.zeros(1, height * width, channels, device=device)
    return count_true_flops(models.rae.decoder, tokens)


#################################################################################
#                              Loading                                          #
#################################################################################


def class_names(num_classes: int, config: dict) -> list[str]:
    """Names for the page's class list: the digits', ImageNet's (from Gradio's bundled list) or "class N"."""
    if (config.get("data") or {}).get("kind") == "digits" and num_classes == 10:
        return [str(d) for d in range(10)]
    if num_classes == 1000:
        from gradio.media import get_file

        try:
            names = json.loads(Path(get_file("imagenet_labels.json")).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            names = []
        if len(names) == 1000:  # ImageNet's list repeats a few names: the id keeps every choice unique
            return [f"{i} {name}" for i, name in enumerate(names)]
    return [f"class {i}" for i in range(num_classes)]


def _teacher_steps(spec: str) -> int:
    """The teacher run's first evaluation setting (its eval.teacher_steps), else DEFAULT_TEACHER_STEPS."""
    steps = ((run_config(spec).get("eval") or {}).get("teacher_steps")) or [DEFAULT_TEACHER_STEPS]
    return int(steps[0])


def load(args: argparse.Namespace, device: torch.device) -> Generator:
    """The student, its decoder and (unless --teacher none) the teacher its run names, checked and warm."""
    models = load_models(args.ckpt, device, args.decoder, args.stats)
    if not models.model.is_meanflow:
        raise ValueError(f"--ckpt {args.ckpt} is a flow-matching teacher; the app needs a MeanFlow student "
                         "(give the teacher as --teacher beside it)")
    config = run_config(args.ckpt)
    teacher = None
    spec = args.teacher or config.get("teacher")
    if spec and spec != "none":
        try:
            model, _ = load_backbone(spec, device, meanflow=False)
        except FileNotFoundError as err:
            named = "--teacher" if args.teacher else f"the teacher named by {args.ckpt}'s config"
            raise FileNotFoundError(f"{named}: {err} (pass --teacher PATH, or --teacher none)") from None
        if model.latent_shape != models.model.latent_shape or model.num_classes != models.model.num_classes:
            raise ValueError(f"teacher {spec} makes latents {model.latent_shape} for {model.num_classes} classes, "
                             f"the student {models.model.latent_shape} for {models.model.num_classes}")
        steps = args.teacher_steps if args.teacher_steps is not None else _teacher_steps(spec)
        shift = (run_config(spec).get("objective") or {}).get("shift")
        teacher = Teacher(model, str(spec), steps, shift, _backbone_flops(model, device))
    generator = Generator(models, teacher, class_names(models.model.num_classes, config), device)
    # Warm up (first-call allocations, lazy kernels), so the first click's timing is a steady one.
    noise = generator.noise(0, 1)
    generator.student_images(0, noise, 1)
    if teacher is not None:
        generator.teacher_images(0, noise, 1)
    return generator


#################################################################################
#                               The page                                        #
#################################################################################

# Small images stay sharp when enlarged; a gallery is as tall as its images (Gradio's grid keeps a 450 px minimum).
CSS = """
.mfrae-gallery img { image-rendering: pixelated; }
.mfrae-gallery .grid-wrap.fixed-height { min-height: 0; height: auto; }
"""


def _summary(result: Result, who: str, count: int) -> str:
    return (f"**{who}**: {result.nfe} NFE, {result.seconds:.3f} s for {count} image{'s' if count > 1 else ''} "
            f"({result.seconds / count * 1000:.1f} ms per image), {result.gflops_per_image:.3g} GFLOPs per image")


def build_page(generator: Generator, title: str) -> gr.Blocks:
    """The Blocks of the page; every handler is a closure over the loaded `generator`."""
    import gradio as gr

    teacher = generator.teacher
    names = generator.class_names

    def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Bad input -> an error message on the page (gr.Error), never a stack trace."""
        @functools.wraps(fn)  # keeps the parameter names, which name the API's parameters
        def wrapper(*values: Any) -> Any:
            try:
                return fn(*values)
            except ValueError as err:
                raise gr.Error(str(err), print_exception=False) from None
        return wrapper

    @checked
    def on_generate(label: Any, seed: Any, count: Any, steps: str, n_steps: Any, compare: bool,
                    teacher_steps: Any) -> tuple[list, str, list, str]:
        label_id = generator.class_id(label)
        seed_value = generator.integer(seed, "seed", 0, MAX_SEED)
        number = generator.integer(count, "number of images", 1, MAX_IMAGES)
        student_steps = generator.integer(n_steps if steps == "N" else steps, "steps", 1, MAX_STEPS)
        noise = generator.noise(seed_value, number)
        student = generator.student_images(label_id, noise, student_steps)
        captions = [f"#{i}" for i in range(number)]  # the sample index: image i of `mfrae sample --seed`
        student_text = _summary(student, f"student, {student_steps} step{'s' if student_steps > 1 else ''}", number)
        teacher_gallery, teacher_text = [], ""
        if compare and teacher is not None:
            evaluations = generator.integer(teacher_steps, "teacher steps", 1, MAX_STEPS)
            result = generator.teacher_images(label_id, noise, evaluations)
            teacher_gallery = list(zip(result.images, captions))
            teacher_text = (_summary(result, f"teacher, {evaluations} Euler steps", number)
                            + f"; the student was {result.seconds / max(student.seconds, 1e-9):.1f}x faster")
        return list(zip(student.images, captions)), student_text, teacher_gallery, teacher_text

    @checked
    def on_interpolate(label: Any, seed_a: Any, seed_b: Any, frames: Any) -> tuple[list, str]:
        label_id = generator.class_id(label)
        a, b = generator.integer(seed_a, "seed", 0, MAX_SEED), generator.integer(seed_b, "second seed", 0, MAX_SEED)
        number = generator.integer(frames, "number of frames", 2, MAX_IMAGES)
        result = generator.student_images(label_id, generator.interpolation_noise(a, b, number), 1)
        captions = [f"{w:.2f}" for w in np.linspace(0, 1, number)]
        return list(zip(result.images, captions)), _summary(result, f"slerp seed {a} -> seed {b}, 1 step", number)

    def new_seed() -> int:
        return random.randint(0, 2**31 - 1)

    # PNG: lossless, as `mfrae sample` writes them; the gallery as tall as its images, not a fixed box.
    gallery = {"format": "png", "columns": 4, "height": "auto", "object_fit": "contain",
               "elem_classes": "mfrae-gallery"}
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nOne-step generation with the MeanFlow student `{generator.models.files['weights']}` "
                    f"on {generator.device}"
                    + (f", beside its teacher `{teacher.spec}`." if teacher is not None else "."))
        with gr.Row():
            label = gr.Dropdown(names, value=names[0], label="class", allow_custom_value=True, filterable=True)
            seed = gr.Number(0, label="seed")
            seed_button = gr.Button("new seed", scale=0)
            count = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images")
        with gr.Row():
            steps = gr.Radio(["1", "2", "N"], value="1", label="student steps")
            n_steps = gr.Number(4, label="N (when steps is N)")
            compare = gr.Checkbox(teacher is not None, label="compare with the teacher", visible=teacher is not None)
            teacher_steps = gr.Number(teacher.steps if teacher else DEFAULT_TEACHER_STEPS, label="teacher steps",
                                      visible=teacher is not None)
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            with gr.Column():
                student_gallery = gr.Gallery(label="MeanFlow student", elem_id="student", **gallery)
                student_info = gr.Markdown(elem_id="student-info")
            with gr.Column(visible=teacher is not None):
                teacher_gallery = gr.Gallery(label="flow-matching teacher", elem_id="teacher", **gallery)
                teacher_info = gr.Markdown(elem_id="teacher-info")
        gr.Markdown("## Latent interpolation\nImage 0 of the seed above to image 0 of a second seed: slerp between "
                    "their noises, same class, 1 step.")
        with gr.Row():
            seed_b = gr.Number(1, label="second seed")
            frames = gr.Slider(2, MAX_IMAGES, value=8, step=1, label="frames")
            interpolate_button = gr.Button("Interpolate", elem_id="interpolate")
        strip = gr.Gallery(label="interpolation", elem_id="interpolation", **{**gallery, "columns": 8})
        strip_info = gr.Markdown()

        seed_button.click(new_seed, None, seed, api_name="new_seed")
        generate_button.click(on_generate, [label, seed, count, steps, n_steps, compare, teacher_steps],
                              [student_gallery, student_info, teacher_gallery, teacher_info], api_name="generate")
        interpolate_button.click(on_interpolate, [label, seed, seed_b, frames], [strip, strip_info],
                                 api_name="interpolate")
    return page


#################################################################################
#                                  CLI                                          #
#################################################################################


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="MeanFlow run directory, checkpoint folder or weights file")
    parser.add_argument("--decoder", help="RAE decoder (default: the run's rae.decoder)")
    parser.add_argument("--stats", help="latent statistics (default: the run's rae.stats)")
    parser.add_argument("--teacher", help="teacher to compare with (default: the run's `teacher`; 'none': no teacher)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help=f"teacher Euler evaluations (default: its run's eval.teacher_steps, else "
                             f"{DEFAULT_TEACHER_STEPS})")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--share", choices=("no", "yes"), default="no",
                        help="'yes': also open a public Gradio share link (needs the internet)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # the optional extra: checked before the models load
    except ModuleNotFoundError:
        raise ValueError(f"the app needs gradio: {INSTALL_HINT}") from None
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.teacher_steps is not None and not 1 <= args.teacher_steps <= MAX_STEPS:
        raise ValueError(f"--teacher-steps must be in [1, {MAX_STEPS}], got {args.teacher_steps}")
    _check_port(args.host, args.port)  # before the models load, which can take minutes
    device = torch.device(args.device)
    generator = load(args, device)
    page = build_page(generator, "mfrae: one-step generation")
    # System fonts: the default theme would fetch Google Fonts, which an offline machine cannot reach.
    theme = gradio.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])
    print(f"serving {args.ckpt} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    try:
        page.launch(server_name=args.host, server_port=args.port, share=args.share == "yes", css=CSS, theme=theme,
                    show_error=True)
    except OSError as err:  # the port was taken meanwhile
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {err}") from None
    return 0


def _check_port(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot serve on {host}:{port} ({err.strerror}): pass another --port") from None
