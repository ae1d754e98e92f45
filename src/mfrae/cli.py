"""`mfrae` command line: a thin dispatcher.

Each sub-command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`;
its module docstring's first line is the help text. Modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mfrae.demo", "run every MF-RAE stage on the bundled digits on a CPU, evaluate, write a report"),
    "eval": ("mfrae.eval.cli", "FID / FD, sFID, Inception Score, precision / recall and class accuracy against a reference"),
    "flops": ("mfrae.flops", "per-image GMACs / GFLOPs and parameter counts of a preset"),
    "toy": ("mfrae.flow.toy", "train FM / CMT / MFD / MFT on a 2-D Gaussian mixture with a closed-form flow"),
    "train": ("mfrae.train.cli", "train one stage: decoder, teacher, cmt, mfd or mft"),
    "cache": ("mfrae.cache", "encode a dataset once into latent shards to train from"),
    "stats": ("mfrae.stats", "compute the latent mean / variance file of a dataset and encoder"),
    "sample": ("mfrae.sample", "generate images with a teacher (ODE) or MeanFlow (1, 2 or N jumps) checkpoint"),
    "study": ("mfrae.study", "test the papers' claims at small scale on the digits (ablations, seeds, verdicts, report)"),
    "app": ("mfrae.app", "a local web page generating images in one step, beside the teacher (needs mfrae[app])"),
    "export": ("mfrae.export", "write a Hub-ready model folder (safetensors, config, model card) from a run or checkpoint"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    parser = argparse.ArgumentParser(prog="mfrae", description="MeanFlow generators in RAE latent space.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    selected = None
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub)
            selected = sub
    return parser, selected


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to the sys.stderr of the moment, not the one it was created with: `main` may
    run many times in one process (tests, notebooks), each time under a different sys.stderr."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the live sys.stderr is used instead
        pass


def _log_to_stderr() -> None:
    logger = logging.getLogger("mfrae")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[mfrae] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _log_to_stderr()
    args.command_line = ["mfrae", *argv]  # recorded in run directories
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input: one clear line, no traceback.
        print(f"mfrae {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk, a missing permission: the file and the cause, in one line
        print(f"mfrae {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling of it (training, sampling) started
        print(f"mfrae {args.command}: interrupted", file=sys.stderr)
        return 130


def one_line(err: BaseException) -> str:
    """The message of `err`; for an error a DataLoader worker raised (torch re-raises it with the worker's whole
    traceback in its message), the worker's own message, which is that traceback's last line."""
    text = str(err)
    if "\n" in text and text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(err).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text


def describe_os_error(err: OSError) -> str:
    """"PATH: cause (ENAME)" for an OSError, without Python's "[Errno N]" prefix."""
    code = errno.errorcode.get(err.errno or 0)
    cause = f"{err.strerror or err}" + (f" [{code}]" if code else "")
    return f"{err.filename}: {cause}" if err.filename else cause


if __name__ == "__main__":
    sys.exit(main())
