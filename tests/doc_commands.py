"""Every command line that README.md and docs/*.md print, and how tests/test_doc_commands.py runs each one.

What counts as a printed command line:
- every line of a fenced code block marked bash, sh, shell or console (console: the lines after a `$ ` prompt),
  with `\\` continuations joined and a trailing `# comment` dropped. `NAME=value` and `export NAME=value` lines
  set shell variables for the lines after them in the same block; a `python - <<'PY'` line takes the block's
  lines up to `PY` as its script.
- an inline code span (`...` in the prose) that starts with a program (`mfrae`, `.venv/bin/mfrae`, `python`,
  `.venv/bin/python`, `torchrun`, `make`, `pip`, `bash`, `hf`, `apt-get`) and is a complete command: for mfrae,
  one that its own parser accepts and that has an argument after the command name. Spans with placeholders
  (`...`, `[--x]`, `{a,b}`, `a|b`, upper-case words such as RUN or DIR), bare command names (`mfrae sample`,
  `make`), incomplete ones (`mfrae sample --ckpt`) and messages (`mfrae app: error: ...`) are references: the
  test checks that their command and every `--option` they name exist, and runs nothing.

Every command line must have an entry in REGISTRY, keyed by the line exactly as printed (continuations joined
by one space, the trailing comment dropped). A missing entry fails the test, which lists the lines to add.

How a line is run (tests/test_doc_commands.py):
- `mfrae ARGS` (also `.venv/bin/mfrae`, `python -m mfrae`): in-process, `mfrae ARGS EXTRA`, in a fresh folder
  (the block's folder for fenced blocks: the lines of one block run in order in one folder, so a later line
  reads what an earlier one wrote). It must exit 0.
- `torchrun ... -m mfrae ARGS`: torchrun's own parser must accept the launcher's part; the mfrae part then runs
  as above in one process.
- `make TARGET`: `make -n TARGET` in the repository must succeed.
- `python benchmarks/X.py ARGS`: the script's main(ARGS EXTRA) in-process.
- `python - <<'PY'`: the heredoc script, with this interpreter, in the block's folder.
- `pip install '.[EXTRA]'` / `'mfrae[EXTRA]'`: EXTRA must be an optional-dependency group of pyproject.toml.
Anything else must be a NotRun entry.

How to register a new line (e.g. one you added to docs/study.md):

    REGISTRY["mfrae study --from runs/demo --out runs/x --fast"] = Run(extra=("--seed", "1"), setup="fast_demo")

- `Run(extra=(...))`: appended arguments; only to make a run small (`--print-config`, `--set train.steps=2`,
  `--num-samples 20`); argparse lets a later option win, so the printed ones are still parsed.
- `Run(setup="name")`: a function `name(folder)` in SETUPS below that puts tiny stand-ins at the paths the
  line reads (weights, images, a run directory), in the folder the line runs in. Add one if none fits.
- `Run(slow=True)`: the line runs only under `pytest -m slow` (over ~15 s); the default suite still parses it.
- `Run(replace={"a": "b"})`: text substitutions before running (an absolute /tmp path -> the test's folder).
- `Run(env={...})`: environment variables while it runs.
- `NotRun("reason")`: cannot run in a test (network, GPU, an hour of CPU). mfrae lines are still parsed in
  full, so a renamed option fails; say in the reason which test covers the behaviour, if one does.
PRINT_CONFIG is `Run(extra=("--print-config",))`, for train / stats / cache lines whose real run is too big.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
PROGRAMS = ("mfrae", ".venv/bin/mfrae", "python", "python3", ".venv/bin/python", "torchrun", "make", "pip", "bash",
            "hf", "apt-get")


@dataclass(frozen=True)
class Run:
    extra: tuple[str, ...] = ()
    setup: str | None = None
    slow: bool = False
    replace: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.extra, self.setup, self.slow))


@dataclass(frozen=True)
class NotRun:
    reason: str


PRINT_CONFIG = Run(extra=("--print-config",))
TINY_TRAIN = ("--set", "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}")

# ------------------------------------------------------------------------------------------------ registry

REGISTRY: dict[str, Run | NotRun] = {
    # README.md
    "make demo": Run(),  # make -n: the recipe is `.venv/bin/mfrae demo --out runs/demo`, registered below
    "make test": Run(),
    "make test-all": Run(),
    "mfrae train decoder --config digits --out runs/digits/decoder": PRINT_CONFIG,
    "mfrae stats --config digits --out runs/digits/stats": Run(extra=("--max-images", "32", *TINY_TRAIN)),
    "mfrae train teacher --config digits --out runs/digits/teacher": PRINT_CONFIG,
    "mfrae train cmt --config digits --out runs/digits/cmt": PRINT_CONFIG,
    "mfrae train mfd --config digits --out runs/digits/mfd": PRINT_CONFIG,
    "mfrae train mft --config digits --out runs/digits/mft": PRINT_CONFIG,
    "mfrae sample --ckpt runs/digits/mfd --steps 1 --num-samples 100 --out samples/mfd-1step":
        Run(extra=("--device", "cpu"), setup="digits_mfd_run"),
    "hf download nyu-visionx/RAE-collections --local-dir models":
        NotRun("downloads the released weights (network); the lines after it read stand-ins"),
    "mfrae cache --config imagenet256-xl --out cache/in256": PRINT_CONFIG,
    'LATENTS="--set data.kind=latents --set data.options.cache_dir=cache/in256"': Run(),
    "torchrun --nproc_per_node 8 -m mfrae train cmt --config imagenet256-xl $LATENTS --out runs/imagenet256-xl/cmt":
        PRINT_CONFIG,
    "torchrun --nproc_per_node 8 -m mfrae train mfd --config imagenet256-xl $LATENTS --out runs/imagenet256-xl/mfd":
        PRINT_CONFIG,
    "torchrun --nproc_per_node 8 -m mfrae sample --ckpt runs/imagenet256-xl/mfd --steps 1 --num-samples 50000 "
    "--labels equal --out samples/mfd-1step": Run(extra=("--num-samples", "24", "--device", "cpu"),
                                                  setup="imagenet_mfd_run"),
    "mfrae eval --samples samples/mfd-1step/samples.npz --reference VIRTUAL_imagenet256_labeled.npz "
    "--inception-weights pt_inception-2015-12-05-6726825d.pth --json":
        Run(extra=("--device", "cpu", "--no-progress"), setup="adm_reference", slow=True),
    ".venv/bin/mfrae app --ckpt runs/demo/mfd": NotRun("serves a page until stopped; tests/test_app.py runs it"),
    "mfrae app --ckpt runs/demo/mfd": NotRun("serves a page until stopped; tests/test_app.py runs it"),
    "pip install '.[app]'": Run(),
    "pip install 'mfrae[wandb]'": Run(),
    "pip install 'mfrae[hub]'": Run(),
    "mfrae demo --out runs/demo": NotRun("the full demo, 20 minutes; tests/test_demo.py runs `mfrae demo --fast`"),
    "mfrae demo --fast": NotRun("3 minutes; tests/test_demo.py runs it (session fixture fast_demo)"),
    "torchrun --nproc_per_node 8 -m mfrae train mfd --config imagenet256-xl --out runs/mfd": PRINT_CONFIG,
    "mfrae study --from runs/demo --out runs/study":
        NotRun("54 minutes after a demo; tests/test_study.py runs `mfrae study --fast` on a fast demo"),
    # docs/app.md
    "apt-get install chromium": NotRun("a system package (network, root)"),
    ".venv/bin/python tests/test_app.py --out docs/app.png -- --ckpt runs/demo/mfd":
        NotRun("needs Chromium and a demo run; tests/test_app.py runs the same page headless when Chromium exists"),
    # docs/benchmarks.md: the printed invocations, made tiny by later options
    ".venv/bin/python benchmarks/train_step.py --json": Run(extra=(
        "--preset", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--in-process")),
    ".venv/bin/python benchmarks/train_step.py --threads 1 --json": Run(extra=(
        "--preset", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--in-process"), slow=True),
    ".venv/bin/python benchmarks/train_step.py --threads 1 --steps 9 --json": Run(extra=(
        "--preset", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--in-process"), slow=True),
    ".venv/bin/python benchmarks/sampling.py --json": Run(extra=(
        "--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu")),
    ".venv/bin/python benchmarks/sampling.py --threads 1 --json": Run(extra=(
        "--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"), slow=True),
    ".venv/bin/python benchmarks/sampling.py --threads 1 --decoder-bf16 --json": Run(extra=(
        "--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"), slow=True),
    ".venv/bin/python benchmarks/sampling.py --threads 1 --compile --json": Run(extra=(
        "--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"), slow=True),
    ".venv/bin/python benchmarks/flops.py --json": Run(extra=("--presets", "imagenet256-s")),
    ".venv/bin/python benchmarks/frechet.py": Run(extra=("--dim", "48", "--samples", "20,300")),
    ".venv/bin/python benchmarks/fid_conventions.py": Run(extra=("--sizes", "8", "--num", "3"), slow=True),
    ".venv/bin/python benchmarks/sample_memory.py": Run(extra=("--sizes", "40,80", "--batch-size", "16",
                                                               "--shard-size", "32"), slow=True),
    "bash benchmarks/gpu_check.sh out/gpu_check": NotRun("needs a CUDA GPU; tests/test_benchmarks.py checks the "
                                                         "script with bash -n and runs its failure path"),
    # docs/derivative_accuracy.md
    ".venv/bin/python benchmarks/derivative_accuracy.py": Run(extra=("--tiny", "--no-dit", "--toy-dims", "2",
                                                                     "--threads", "1")),
    ".venv/bin/python benchmarks/derivative_accuracy.py --json": Run(extra=("--tiny", "--no-dit", "--toy-dims", "2",
                                                                            "--threads", "1")),
    ".venv/bin/python benchmarks/derivative_accuracy.py --tiny": Run(extra=("--no-dit", "--toy-dims", "2",
                                                                            "--threads", "1")),
    "bash benchmarks/gpu_check.sh out/gpu_check --sections derivative_accuracy":
        NotRun("needs a CUDA GPU; the CPU line below runs the same section"),
    ".venv/bin/python benchmarks/gpu_check.py --out out/gpu_check_cpu --tiny --device cpu --sections "
    "derivative_accuracy": Run(slow=True),
    # docs/evaluation.md
    "mfrae sample --ckpt runs/mfd --steps 1 --num-samples 50000 --labels equal --no-png --out samples/mfd-1step":
        Run(extra=("--num-samples", "24", "--device", "cpu"), setup="mfd_run"),
    "export MFRAE_FID_INCEPTION=/data/weights/pt_inception-2015-12-05-6726825d.pth": Run(),
    "mfrae eval --samples samples/mfd-1step/samples.npz --reference /data/adm/VIRTUAL_imagenet256_labeled.npz --json":
        NotRun("reads /data/adm and /data/weights, outside any test folder; the README's eval line runs the same "
               "evaluation on stand-ins (slow)"),
    # docs/huggingface.md
    "mfrae sample --ckpt STUDENT --rae nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 --steps 1 --num-samples 50000 "
    "--out samples": NotRun("downloads an RAE from the Hub (network)"),
    "mfrae cache --config imagenet256-xl --rae nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 --out latents":
        NotRun("downloads an RAE from the Hub (network)"),
    "mfrae eval --samples samples/samples.npz --reference REF.npz --features encoder --rae "
    "nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08": NotRun("downloads an RAE from the Hub (network)"),
    "python - <<'PY'": Run(slow=True),  # 14 s: diffusers
    "mfrae sample --ckpt student.safetensors --rae rae --steps 1 --num-samples 8 --out samples": Run(slow=True),
    "python rt2.py": NotRun("the script printed above it; tests/test_diffusers_rae.py runs the same round trips"),
    'E="rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}"': Run(),
    'mfrae train decoder --config digits --out /tmp/t/decoder --set "$E" --set train.global_batch=8 --set '
    'train.steps=2 --set "model.options={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}"':
        Run(replace={"/tmp/t/": "t/"}),
    'mfrae stats --config digits --out /tmp/t/stats --set "$E"': Run(extra=("--max-images", "64"),
                                                                    replace={"/tmp/t/": "t/"}),
    'mfrae train teacher --config digits --out /tmp/t/teacher --set "$E" --set train.global_batch=8 --set '
    'train.steps=2 --set "model.options={hidden_size: [32, 48], depth: [1, 1], num_heads: [2, 2]}" --set '
    'rae.decoder=/tmp/t/decoder --set rae.stats=/tmp/t/stats': Run(replace={"/tmp/t/": "t/"}),
    "mfrae export --ckpt /tmp/t/teacher --out /tmp/t/folder --repo-id me/tiny-teacher": Run(replace={"/tmp/t/": "t/"}),
    "mfrae sample --ckpt /tmp/t/folder --steps 3 --num-samples 8 --out /tmp/t/samples": Run(
        extra=("--device", "cpu"), replace={"/tmp/t/": "t/"}),
    # docs/study.md (and "mfrae demo --out runs/demo" above)
    "mfrae study --from runs/demo --out runs/study_fast --fast":
        NotRun("needs a demo run; tests/test_study.py runs `mfrae study --fast` on the session's fast demo"),
    "mfrae study --fast --from /tmp/fastbase --out /tmp/study_fast":
        NotRun("needs a demo run; tests/test_study.py runs `mfrae study --fast` on the session's fast demo"),
    "mfrae study --testbed mixture --out runs/study_mixture":
        NotRun("about an hour on 2 cores; tests/test_study_mixture.py runs the same code at a tiny size"),
    "mfrae study --testbed mixture --out runs/study_mixture_fast --fast": Run(extra=("--workers", "1"), slow=True),
}

# ------------------------------------------------------------------------------------------------ stand-ins


def _tiny_sampling_run(folder: Path, run: str) -> None:
    """A run directory holding a tiny MeanFlow student (ema.safetensors) whose config.yaml names a tiny decoder."""
    import yaml

    from conftest import save_tiny_sampling_models

    paths = save_tiny_sampling_models(folder / "standins")
    root = folder / run
    root.mkdir(parents=True, exist_ok=True)
    (root / "ema.safetensors").write_bytes(paths["student"].read_bytes())
    config = {"stage": "mfd", "rae": {"encoder": {"name": "dinov2"}, "decoder": str(paths["decoder"])}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))


def _adm_reference(folder: Path) -> None:
    """Random FID Inception weights and an ADM-layout reference batch (images + precomputed mu / sigma of them)."""
    import numpy as np
    import torch

    from mfrae.eval.inception import FIDInceptionV3
    from mfrae.eval.samples import save_adm_npz

    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), folder / "pt_inception-2015-12-05-6726825d.pth")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    save_adm_npz(folder / "VIRTUAL_imagenet256_labeled.npz", images)  # the eval computes its statistics


SETUPS = {
    "digits_mfd_run": lambda folder: _tiny_sampling_run(folder, "runs/digits/mfd"),
    "imagenet_mfd_run": lambda folder: _tiny_sampling_run(folder, "runs/imagenet256-xl/mfd"),
    "mfd_run": lambda folder: _tiny_sampling_run(folder, "runs/mfd"),
    "adm_reference": _adm_reference,
}

# ------------------------------------------------------------------------------------------------ extraction


@dataclass
class Line:
    doc: Path
    number: int  # 1-based line of the doc where the command starts
    text: str  # as printed: continuations joined by one space, trailing comment dropped
    block: int | None = None  # index of its fenced block in the doc (None: an inline span)
    heredoc: str | None = None  # the script of a `<<'PY'` line
    kind: str = "command"  # command | assignment | reference

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.number}"


def strip_comment(text: str) -> str:
    """`cmd args  # note` -> `cmd args` (a `#` inside quotes or a word is kept)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


_ASSIGNMENT = re.compile(r"^(export\s+)?[A-Za-z_][A-Za-z0-9_]*=")


def fenced_lines(doc: Path) -> list[Line]:
    lines = doc.read_text().splitlines()
    out: list[Line] = []
    i, block = 0, -1
    while i < len(lines):
        match = re.match(r"^\s*```(\w*)", lines[i])
        if not match:
            i += 1
            continue
        info, body, start = match.group(1), [], i + 1
        i += 1
        while i < len(lines) and not re.match(r"^\s*```", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        block += 1
        if info not in SHELL_FENCES:
            continue
        j = 0
        while j < len(body):
            number, raw = start + j + 1, body[j]
            if info == "console":
                if not raw.lstrip().startswith("$ "):
                    j += 1
                    continue
                raw = raw.lstrip()[2:]
            while raw.rstrip().endswith("\\") and j + 1 < len(body):
                j += 1
                raw = raw.rstrip()[:-1].rstrip() + " " + body[j].strip()
            j += 1
            text = strip_comment(" ".join(raw.split()))
            if not text:
                continue
            line = Line(doc, number, text, block)
            heredoc = re.search(r"<<-?\s*'?(\w+)'?$", text)
            if heredoc:
                end = next(k for k in range(j, len(body)) if body[k].strip() == heredoc.group(1))
                line.heredoc = "\n".join(body[j:end]) + "\n"
                j = end + 1
            if _ASSIGNMENT.match(text):
                line.kind = "assignment"
            out.append(line)
    return out


_PLACEHOLDER = re.compile(r"\.\.\.|[\[\]{}|<>]|\b[A-Z][A-Z0-9_]{1,}\b")


def inline_lines(doc: Path) -> list[Line]:
    text = doc.read_text()
    out = []
    fence = re.compile(r"^\s*```.*?^\s*```[^\n]*$", re.S | re.M)
    spans = []
    last = 0
    for match in fence.finditer(text):
        spans.append((last, text[last:match.start()]))
        last = match.end()
    spans.append((last, text[last:]))
    for offset, chunk in spans:
        for match in re.finditer(r"`([^`\n]+)`", chunk):
            code = " ".join(match.group(1).split())
            words = code.split()
            if not words or words[0] not in PROGRAMS:
                continue
            number = text.count("\n", 0, offset + match.start()) + 1
            line = Line(doc, number, code)
            unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", code)  # '.[app]' is a value, not a placeholder
            if re.match(r"^mfrae [\w-]+: ", code) or len(words) == 1 or _PLACEHOLDER.search(unquoted):
                line.kind = "reference"
            out.append(line)
    return out


def all_lines() -> list[Line]:
    return [line for doc in DOCS for line in (*fenced_lines(doc), *inline_lines(doc))]
