"""Every command line printed in README.md and docs/*.md runs, as printed, on tiny stand-ins (or is parsed in full
where it cannot run here, with the reason registered): no recipe can rot. What counts as a command line, how each
kind is run and how to register a new one: tests/doc_commands.py."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shlex
import subprocess
import sys
import tomllib

import pytest

from doc_commands import DOCS, REGISTRY, REPO, SETUPS, Line, NotRun, Run, all_lines, fenced_lines, inline_lines
from mfrae.cli import COMMANDS, build_parser, main

MFRAE = ("mfrae", ".venv/bin/mfrae")
PYTHONS = ("python", "python3", ".venv/bin/python")


def mfrae_args(argv: list[str]) -> list[str] | None:
    """The arguments of the mfrae command that argv runs (directly, with python -m or under torchrun), else None."""
    if argv[0] in MFRAE:
        return argv[1:]
    if argv[0] in PYTHONS and argv[1:3] == ["-m", "mfrae"]:
        return argv[3:]
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parsed = get_args_parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"torchrun refuses {shlex.join(argv)}: {err.getvalue().strip()}")
        assert parsed.module and parsed.training_script == "mfrae", f"not an mfrae launch: {shlex.join(argv)}"
        return list(parsed.training_script_args)
    return None


def parse_error(args: list[str]) -> str | None:
    """None when mfrae's own parser accepts `args` in full, else its message."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            parser, _ = build_parser(args)
            parser.parse_args(args)
        except SystemExit as exit_:
            return err.getvalue().strip().splitlines()[-1] if exit_.code else None
    return None


def is_runnable_inline(line: Line) -> bool:
    """An inline span that is a complete command line (else a reference: see tests/doc_commands.py)."""
    if line.kind != "command":
        return False
    words = shlex.split(line.text)
    args = mfrae_args(words) if words[0] != "torchrun" else words
    if args is not None and words[0] != "torchrun":
        return len(args) >= 2 and parse_error(args) is None
    return True


def command_lines() -> list[Line]:
    return [line for line in all_lines()
            if line.kind in ("command", "assignment") and (line.block is not None or is_runnable_inline(line))]


def test_every_printed_command_line_is_registered():
    lines = command_lines()
    missing = [f"  {line.where}: {line.text!r}" for line in lines if line.text not in REGISTRY]
    assert not missing, ("command lines printed in the docs that no test runs; register each in "
                         "tests/doc_commands.py REGISTRY (see its docstring):\n" + "\n".join(missing))
    printed = {line.text for line in lines}
    stale = [f"  {key!r}" for key in REGISTRY if key not in printed]
    assert not stale, "REGISTRY entries that no doc prints any more; remove them:\n" + "\n".join(stale)


def test_the_extraction_sees_fences_continuations_comments_and_inline_commands(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run `mfrae demo --fast` or `mfrae sample --ckpt`.\n\n```bash\nA=\"x y\"  # note\n"
                   "mfrae train teacher --config digits \\\n    --out r   # comment\n```\n\n```python\nmfrae no\n```\n"
                   "```console\n$ make test\noutput\n```\n")
    fenced = [(line.text, line.kind, line.number) for line in fenced_lines(doc)]
    assert fenced == [('A="x y"', "assignment", 4), ("mfrae train teacher --config digits --out r", "command", 5),
                      ("make test", "command", 13)]
    inline = [(line.text, line.kind) for line in inline_lines(doc)]
    assert inline == [("mfrae demo --fast", "command"), ("mfrae sample --ckpt", "command")]
    assert [is_runnable_inline(line) for line in inline_lines(doc)] == [True, False]


def _references() -> list[Line]:
    return [line for line in all_lines() if line.block is None and not is_runnable_inline(line)
            and (line.text.split()[0] in MFRAE or line.text.startswith("python -m mfrae"))]


def test_referenced_commands_and_options_exist():
    """Inline references (`mfrae sample --no-png`, synopses with placeholders) name real commands and options."""
    bad = []
    for line in _references():
        words = line.text.split()
        if words[0] in ("python",):
            words = words[2:]
        if len(words) < 2 or words[1].endswith(":"):  # a bare program name, or a message `mfrae app: error: ...`
            continue
        for command in words[1].split("/"):
            if command not in COMMANDS:
                bad.append(f"{line.where}: {line.text!r}: no command {command!r}")
                continue
            parser, sub = build_parser([command])
            known = {opt for action in sub._actions for opt in action.option_strings}
            for word in words[2:]:
                option = word.strip("[]{}").split("=")[0]
                if option.startswith("--") and option not in known:
                    bad.append(f"{line.where}: {line.text!r}: `mfrae {command}` has no option {option}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------- running them


def expand(line: Line, assignments: list[str], folder) -> list[str]:
    """argv of `line` after the shell's own expansion and quote removal, with the block's variables set."""
    script = "\n".join([*assignments, f"printf '%s\\0' {line.text}"])
    out = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "HOME": str(folder)})
    return out.stdout.split("\0")[:-1]


def run_line(line: Line, entry: Run, argv: list[str], folder, monkeypatch) -> None:
    argv = [_replace(word, entry.replace) for word in argv]
    for key, value in entry.env.items():
        monkeypatch.setenv(key, value)
    if entry.setup:
        SETUPS[entry.setup](folder)
    monkeypatch.chdir(folder)
    where = f"{line.where}: {line.text}"
    args = mfrae_args(argv)
    if args is not None:
        code = main([*args, *entry.extra])
        assert code == 0, f"{where}: exit status {code}"
    elif argv[0] in PYTHONS and argv[1:2] == ["-"]:
        proc = subprocess.run([sys.executable, "-"], input=line.heredoc, cwd=folder, capture_output=True, text=True)
        assert proc.returncode == 0, f"{where}: {proc.stderr[-2000:]}"
    elif argv[0] in PYTHONS and argv[1].startswith("benchmarks/"):
        spec = importlib.util.spec_from_file_location(f"doc_{os.path.basename(argv[1])[:-3]}", REPO / argv[1])
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        assert module.main([*argv[2:], *entry.extra]) in (0, None), where
    elif argv[0] == "make":
        proc = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{where}: {proc.stderr}"
    elif argv[:2] == ["pip", "install"] and len(argv) == 3 and "[" in argv[2]:
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for extra in argv[2].split("[", 1)[1].rstrip("]").split(","):
            assert extra in extras, f"{where}: pyproject.toml has no extra {extra!r}"
    else:
        pytest.fail(f"{where}: no way to run this here; register it as NotRun(reason) in tests/doc_commands.py")


def _replace(word: str, replace: dict) -> str:
    for old, new in replace.items():
        word = word.replace(old, new)
    return word


def check_not_run(line: Line, argv: list[str]) -> None:
    args = mfrae_args(argv) if argv[0] != "python" or argv[1:2] == ["-m"] else None
    if args is not None and len(args) >= 2:
        error = parse_error(args)
        assert error is None, f"{line.where}: {line.text}: {error}"


def run_lines(lines: list[Line], tmp_path, monkeypatch, slow: bool) -> None:
    assignments: list[str] = []
    folder = tmp_path / "cwd"
    folder.mkdir()
    for line in lines:
        entry = REGISTRY.get(line.text)
        if entry is None:
            pytest.fail(f"{line.where}: {line.text!r} is not registered (tests/doc_commands.py)")
        if line.kind == "assignment":
            assignments.append(line.text)
            name, _, value = line.text.removeprefix("export ").partition("=")
            if line.text.startswith("export "):
                monkeypatch.setenv(name, shlex.split(value)[0] if value else "")
            continue
        argv = expand(line, assignments, folder) if line.heredoc is None else ["python", "-"]
        if isinstance(entry, NotRun):
            check_not_run(line, argv)
        elif entry.slow and not slow:
            check_not_run(line, argv)
        else:
            run_line(line, entry, argv, folder, monkeypatch)


def _blocks() -> list:
    params = []
    for doc in DOCS:
        blocks: dict[int, list[Line]] = {}
        for line in fenced_lines(doc):
            blocks.setdefault(line.block, []).append(line)
        for index, lines in blocks.items():
            slow = any(isinstance(REGISTRY.get(line.text), Run) and REGISTRY[line.text].slow for line in lines)
            name = f"{doc.relative_to(REPO)}:{lines[0].number}"
            params.append(pytest.param(lines, False, id=name))
            if slow:
                params.append(pytest.param(lines, True, id=f"{name}-slow", marks=pytest.mark.slow))
    return params


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lines,slow", _blocks())
def test_a_printed_block_runs_as_printed(lines, slow, tmp_path, monkeypatch):
    run_lines(lines, tmp_path, monkeypatch, slow)


def _inline() -> list:
    params = []
    for line in all_lines():
        if line.block is None and is_runnable_inline(line):
            params.append(pytest.param(line, False, id=line.where))
            entry = REGISTRY.get(line.text)
            if isinstance(entry, Run) and entry.slow:
                params.append(pytest.param(line, True, id=f"{line.where}-slow", marks=pytest.mark.slow))
    return params


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("line,slow", _inline())
def test_a_printed_inline_command_runs_as_printed(line, slow, tmp_path, monkeypatch):
    run_lines([line], tmp_path, monkeypatch, slow)
