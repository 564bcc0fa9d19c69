"""The `mtp` command line: `mtp <command> [options]`, the commands listed in COMMANDS (`mtp --help`).

Errors, the same for every command. Options and input files are checked before any model is loaded, so a
mistake costs seconds, not a model load: a bad value, a missing or malformed file is a usage error, one line
`mtp <command>: error: ...` naming the option, or the file and line, on stderr with exit code 2 (argparse's
convention; `ArgumentParser`, `bounded`, `read_or_exit` and `checkpoints.model_dir` are the shared
pieces). An error the library raises while a command runs (ValueError, OSError, RuntimeError: their
messages are written for users) is printed by `main` as the same one line with exit code 1;
`MTP_TRACEBACK=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path


DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"  # the 4.2M test fixture (`mtp_model.demo_cli`)

# name: (module, function, what it does in one line for `mtp --help`)
COMMANDS = {
    "demo": ("mtp_model.demo_cli", "demo", "stock greedy against multi-token generation, same text, and the speed-up"),
    "train": ("mtp_model.train_cli", "train_main", "train an MTP adapter for a local model on a JSONL file"),
    "eval": ("mtp_model.evaluate", "eval_main", "tokens per step and speed-up per domain of a model and its adapter"),
    "fetch": ("mtp_model.checkpoints", "fetch_main", "print the local directory of a known model, converting it once"),
    "convert-gguf": ("mtp_model.checkpoints", "convert_main", "convert a GGUF checkpoint to a float32 HF directory"),
    "build-adapter": ("mtp_model.recipes", "build_main", "build the adapter of a known model (distill, then train)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors one line `<prog>: error: <message>` with exit code 2: the usage
    block argparse prints first would bury that line (`--help` shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded(kind, low=None, high=None, low_open: bool = False):
    """An argparse `type`: a finite `kind` (int or float) in [low, high] ((low, high] with low_open); any
    other value is a usage error naming the option, e.g. `argument --steps: must be >= 1, got 0`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            if high is None:
                bounds = f"{'>' if low_open else '>='} {low}"
            else:
                bounds = f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def read_or_exit(parser: argparse.ArgumentParser, read, path, *args):
    """read(path, *args), or a usage error (exit 2) when the file is missing or unreadable, or when `read`
    refuses its content (a ValueError, whose message names the file and line)."""
    try:
        return read(path, *args)
    except OSError as error:
        parser.error(f"{path}: {error.strerror or error}")
    except ValueError as error:
        parser.error(str(error))


def bold(text: str) -> str:
    """`text` in bold on a terminal; unchanged when stdout is piped or NO_COLOR is set (no-color.org)."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[1m{text}\033[0m"
    return text


def _overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: mtp <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "`mtp <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_overview())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"usage: mtp <command> [options]\nmtp: error: {problem} (choose from {', '.join(COMMANDS)}; "
              f"`mtp --help` says what each does)", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    command = getattr(importlib.import_module(module), function)
    try:
        return command(argv[1:]) or 0
    except (ValueError, OSError, RuntimeError) as error:
        if os.environ.get("MTP_TRACEBACK"):
            raise
        print(f"mtp {argv[0]}: error: {error or type(error).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
