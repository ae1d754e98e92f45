"""`mfrae app`: the real server in a subprocess on a free localhost port, driven through its API by gradio_client
(and, marked slow, through the page itself by headless Chromium).

Tiny random models (tests/conftest.py) stand in for a run: a MeanFlow student, a flow-matching teacher and a
32 px decoder, passed as --ckpt / --teacher / --decoder. Checked: the images' count and pixel shape, the class
and steps reaching the sampler (NFE in the summary), the same seed giving the same images and another seed other
ones, the teacher's images beside the student's with both timings, the interpolation strip (its ends are the
two seeds' image 0), and bad input (steps 0, an unknown class, a non-integer seed, too many images) coming back
as an error message while the server keeps serving; a bad --ckpt or --teacher, a teacher as --ckpt, a busy port
and a missing gradio give the CLI's one line.

The Chromium driver speaks the DevTools protocol over `--remote-debugging-pipe` (JSON messages ended by NUL on
file descriptors 3 and 4), so it needs no websocket package. It also makes docs/app.png against the demo:

    .venv/bin/python tests/test_app.py --out docs/app.png -- --ckpt runs/demo/mfd
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT = 300  # seconds for the server to import gradio, load the models and serve (a busy 2-core CPU)
ENV = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}


#################################################################################
#                        The server in a subprocess                             #
#################################################################################


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(app_args: list[str], log: Path, tries: int = 3) -> Iterator[str]:
    """Run `mfrae app APP_ARGS` on a free port until the block ends (always stopped); yields its URL.

    A port taken between choosing and binding it (another process won the race) is retried with a new one."""
    env = {**os.environ, **ENV, "GRADIO_TEMP_DIR": str(log.parent / "gradio-tmp")}
    for _ in range(tries):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mfrae", "app", *app_args, "--port", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and not _ready(url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mfrae app did not serve {url} within {START_TIMEOUT} s:\n{log.read_text()}")
                time.sleep(1)
            if proc.poll() is None:
                yield url
                assert proc.poll() is None, f"the server stopped:\n{log.read_text()}"
                return
            text = log.read_text()
            if "port" not in text.lower():  # died for another reason than its port: no retry helps
                raise RuntimeError(f"mfrae app exited with {proc.returncode}:\n{text}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    raise RuntimeError(f"mfrae app found no free port in {tries} tries:\n{log.read_text()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from conftest import save_tiny_sampling_models

    return save_tiny_sampling_models(tmp_path_factory.mktemp("app-models"))


def tiny_args(tiny: dict[str, Path]) -> list[str]:
    return ["--ckpt", str(tiny["student"]), "--decoder", str(tiny["decoder"]), "--teacher", str(tiny["teacher"]),
            "--teacher-steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    from gradio_client import Client

    root = tmp_path_factory.mktemp("app-server")
    with serve(tiny_args(tiny), root / "server.log") as url:
        yield Client(url, verbose=False, download_files=str(root / "downloads"))


def pixels(gallery: list[dict]) -> np.ndarray:
    """The images of a Gallery output (files the client downloaded) as uint8 [N, H, W, 3]."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery])


def generate(client, **inputs):
    return client.predict(**{"label": "class 0", "seed": 0, "count": 4, "steps": "1", "n_steps": 4,
                             "compare": True, "teacher_steps": 4, **inputs}, api_name="/generate")


#################################################################################
#                                 The API                                       #
#################################################################################


def test_generate_images_and_teacher(client):
    student, student_text, teacher, teacher_text = generate(client, count=3)
    images = pixels(student)
    assert images.shape == (3, 32, 32, 3)
    assert pixels(teacher).shape == (3, 32, 32, 3)
    assert "1 NFE" in student_text and "s for 3 images" in student_text and "GFLOPs per image" in student_text
    assert "4 NFE" in teacher_text and "faster" in teacher_text
    assert images.std() > 0  # not a blank image


def test_class_and_steps_reach_the_sampler(client):
    base = pixels(generate(client, label="class 0")[0])
    other_class = generate(client, label="class 7", steps="2", compare=False)
    assert "2 NFE" in other_class[1] and other_class[2] == [] and other_class[3] == ""
    assert not np.array_equal(pixels(other_class[0]), base)
    by_id = generate(client, label="7", steps="2", compare=False)  # an id names the same class
    np.testing.assert_array_equal(pixels(by_id[0]), pixels(other_class[0]))
    n_steps = generate(client, steps="N", n_steps=3, compare=False)
    assert "3 NFE" in n_steps[1]


def test_seeds_are_reproducible(client):
    first = pixels(generate(client, seed=11, compare=False)[0])
    again = pixels(generate(client, seed=11, compare=False)[0])
    other = pixels(generate(client, seed=12, compare=False)[0])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1])  # each image of a request has its own noise


def test_interpolation_strip(client):
    strip, text = client.predict(label="class 2", seed_a=5, seed_b=9, frames=5, api_name="/interpolate")
    frames = pixels(strip).astype(int)
    assert frames.shape == (5, 32, 32, 3) and "1 NFE" in text
    # its ends are image 0 of each seed (up to a rounding flip of the slerp weights 0 and 1)
    for seed, frame in ((5, frames[0]), (9, frames[-1])):
        image = pixels(generate(client, label="class 2", seed=seed, count=1, compare=False)[0])[0].astype(int)
        assert np.abs(frame - image).max() <= 1
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[-1])


@pytest.mark.parametrize(("inputs", "message"), [
    ({"steps": "N", "n_steps": 0}, "steps must be in [1, 1000], got 0"),
    ({"label": "cat"}, "unknown class 'cat'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"compare": True, "teacher_steps": -2}, "teacher steps must be in [1, 1000]"),
    ({"count": 65}, "65"),  # the slider's own bound
])
def test_bad_input_is_a_message(client, inputs, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        generate(client, **inputs)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)
    assert pixels(generate(client, count=1, compare=False)[0]).shape == (1, 32, 32, 3)  # still serving


def test_bad_interpolation_input(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict(label="class 2", seed_a=5, seed_b="x", frames=4, api_name="/interpolate")
    assert "second seed must be an integer" in str(err.value)


#################################################################################
#                                 The CLI                                       #
#################################################################################


def main_app(args: list[str]) -> int:
    from mfrae.cli import main

    return main(["app", *args])


def test_bad_ckpt_is_one_line(tiny, tmp_path, capsys):
    assert main_app(["--ckpt", str(tmp_path / "missing"), "--decoder", str(tiny["decoder"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mfrae app: error:") and "missing" in err and "\n" not in err
    assert main_app(["--ckpt", str(tiny["teacher"]), "--decoder", str(tiny["decoder"])]) == 2
    assert "flow-matching teacher" in capsys.readouterr().err
    assert main_app([*tiny_args(tiny), "--teacher", str(tmp_path / "nowhere")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_busy_port_is_one_line(tiny, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main_app([*tiny_args(tiny), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_missing_gradio_names_the_extra(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    assert main_app(tiny_args(tiny)) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mfrae app: error: the app needs gradio: pip install 'mfrae[app]'"


def test_class_names():
    from mfrae.app import class_names

    assert class_names(10, {"data": {"kind": "digits"}}) == [str(d) for d in range(10)]
    assert class_names(3, {}) == ["class 0", "class 1", "class 2"]
    imagenet = class_names(1000, {})  # ImageNet's names, from the list Gradio bundles; the id keeps them unique
    assert imagenet[0] == "0 tench" and len(set(imagenet)) == 1000


def test_slerp_keeps_the_norm():
    import torch

    from mfrae.app import slerp

    a, b = torch.randn(2, 8 * 16 * 16).unbind()
    middle = slerp(a, b, 0.5)
    assert abs(middle.norm() / a.norm() - 1) < 0.1  # a straight line's midpoint would have about 0.71 the norm
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, a, 0.3), a)


#################################################################################
#                      The page in headless Chromium                            #
#################################################################################


class Chromium:
    """Headless Chromium driven by the DevTools protocol over a pipe (no websocket client needed)."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000) -> None:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        # The protocol pipe must be descriptors 3 (commands) and 4 (replies) in the browser; bash, not sh: dash
        # refuses the two-digit descriptor numbers a busy process (pytest) has.
        script = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        self.log = profile / "chromium.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, str(CHROMIUM), *flags, "about:blank"],
                                         pass_fds=(to_browser, from_browser), stdout=log, stderr=log)
        os.close(to_browser)
        os.close(from_browser)
        self._replies: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._out, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    reply = json.loads(message)
                    if "id" in reply:  # events (no id) are not needed here
                        self._replies.put(reply)

    def send(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        try:
            os.write(self._in, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"chromium exited ({self.proc.poll()}):\n{self.log.read_text()[-3000:]}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._replies.get(timeout=max(0.1, deadline - time.monotonic()))
            if reply["id"] == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied: {expression}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        """The whole page (not only the window) as a PNG."""
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.scrollWidth")
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        time.sleep(1)  # let the layout settle at the new size
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)


# A button by elem_id (Gradio puts it on the button itself); then every result shown: the student's and the
# teacher's summaries and all their images loaded; then the interpolation strip.
CLICK = "(e => (e.tagName === 'BUTTON' ? e : e.querySelector('button')).click())(document.querySelector('#{}'))"
DONE = ("document.querySelector('#student-info')?.innerText.includes('GFLOPs') && "
        "(!document.querySelector('#teacher-info') || document.querySelector('#teacher-info').offsetParent === null"
        " || document.querySelector('#teacher-info').innerText.includes('GFLOPs')) && "
        "[...document.querySelectorAll('#student img, #teacher img')].every(i => i.complete && i.naturalWidth > 0)"
        " && document.querySelectorAll('#student img').length > 0")
STRIP_DONE = ("document.querySelectorAll('#interpolation img').length > 0 && "
              "[...document.querySelectorAll('#interpolation img')].every(i => i.complete && i.naturalWidth > 0)")


def page_screenshot(url: str, out: Path, timeout: float = 300) -> dict:
    """Load the page, click Generate, then Interpolate, wait for the images and save a full-page PNG; returns what
    the page shows (image counts and the summaries)."""
    with tempfile.TemporaryDirectory(prefix="mfrae-chromium-") as profile:
        browser = Chromium(Path(profile))
        try:
            browser.send("Page.enable", session=True)
            browser.send("Page.navigate", session=True, url=url)
            browser.wait_for("document.querySelector('#generate') !== null", timeout)
            browser.evaluate(CLICK.format("generate"))
            browser.wait_for(DONE, timeout)
            browser.evaluate(CLICK.format("interpolate"))
            browser.wait_for(STRIP_DONE, timeout)
            shown = browser.evaluate("({student: document.querySelectorAll('#student img').length, "
                                     "teacher: document.querySelectorAll('#teacher img').length, "
                                     "strip: document.querySelectorAll('#interpolation img').length, "
                                     "text: document.querySelector('#student-info').innerText + ' | ' + "
                                     "(document.querySelector('#teacher-info')?.innerText ?? '')})")
            browser.screenshot(out)
        finally:
            browser.close()
    return shown


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_page_in_chromium(tiny, tmp_path):
    from PIL import Image

    with serve(tiny_args(tiny), tmp_path / "server.log") as url:
        shown = page_screenshot(url, tmp_path / "page.png")
    # the default 8 images on both sides and 8 interpolation frames
    assert shown["student"] >= 8 and shown["teacher"] >= 8 and shown["strip"] >= 8, shown
    assert "1 NFE" in shown["text"] and "4 NFE" in shown["text"], shown
    image = np.asarray(Image.open(io.BytesIO((tmp_path / "page.png").read_bytes())).convert("RGB"))
    assert image.shape[0] > 500 and image.shape[1] >= 1000 and image.std() > 10


def main(argv: list[str] | None = None) -> int:
    """Start `mfrae app APP_ARGS`, click Generate and Interpolate in headless Chromium, save the page as --out."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "app.png")
    parser.add_argument("app_args", nargs="+", help="after --: the arguments of mfrae app (no --port)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mfrae-app-screenshot-"))
    try:
        with serve(args.app_args, work / "server.log") as url:
            shown = page_screenshot(url, args.out)
        print(f"wrote {args.out}: {shown['student']} student, {shown['teacher']} teacher and {shown['strip']} "
              f"interpolation images; {shown['text']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
