"""The ``rtkern`` command line (console script ``rtkern``, or ``python -m rtkern.cli``).

Commands are registered in `COMMANDS`, keyed by their word path (``("bench", "sampler")``). Each entry
names a function that adds the command's options to its argparse parser and a handler that runs it and
returns the exit status. Handlers import their implementation lazily, so ``rtkern --help`` stays fast
and a command whose dependencies are missing does not break the others.

To add a command, define ``_configure(parser)`` and ``_run(args) -> int`` and call `register`, e.g.::

    register(("generate",), "generate text with refusal control", _configure_generate, _run_generate)

Registering a path again replaces the previous entry.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

EXIT_NOT_AVAILABLE = 2


@dataclass
class Command:
    path: tuple[str, ...]
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUP_HELP: dict[tuple[str, ...], str] = {("bench",): "benchmarks (table to stdout, JSON and PNG to --out)"}


def register(path: Sequence[str], help: str, configure: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> Command:
    """Add (or replace) the command at ``path``; a path of several words nests under command groups."""
    cmd = Command(tuple(path), help, configure, run)
    COMMANDS[cmd.path] = cmd
    return cmd


# ---------------------------------------------------------------------------------------------------
# bench sampler
# ---------------------------------------------------------------------------------------------------

def _configure_bench_sampler(p: argparse.ArgumentParser) -> None:
    from .bench.sampler import add_arguments
    add_arguments(p)


def _run_bench_sampler(args: argparse.Namespace) -> int:
    from .bench.sampler import run_from_args
    return run_from_args(args, getattr(args, "_argv_tail", None))


register(("bench", "sampler"), "fused refusal sampler vs naive PyTorch / CUDA graph / torch.compile / FlashInfer",
         _configure_bench_sampler, _run_bench_sampler)


# ---------------------------------------------------------------------------------------------------
# generate, bench decode
# ---------------------------------------------------------------------------------------------------

def _configure_generate(p: argparse.ArgumentParser) -> None:
    from .generate_cli import configure
    configure(p)


def _run_generate(args: argparse.Namespace) -> int:
    from .generate_cli import run
    return run(args)


register(("generate",), "generate text with refusal control; prints answers and refusal probabilities",
         _configure_generate, _run_generate)


def _configure_bench_decode(p: argparse.ArgumentParser) -> None:
    from .bench.decode import add_arguments
    add_arguments(p)


def _run_bench_decode(args: argparse.Namespace) -> int:
    from .bench.decode import run_from_args
    return run_from_args(args)


register(("bench", "decode"), "decode ms/step and tok/s: rtkern engine vs transformers generate and gpt-fast style",
         _configure_bench_decode, _run_bench_decode)


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------

def _configure_train(p: argparse.ArgumentParser) -> None:
    from .train.cli import configure
    configure(p)


def _run_train(args: argparse.Namespace) -> int:
    from .train.cli import run
    return run(args)


register(("train",), "SFT with refusal tokens (control token as the first assistant token; HF checkpoints)",
         _configure_train, _run_train)


# ---------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------

def _configure_calibrate(p: argparse.ArgumentParser) -> None:
    from .calibrate_cli import configure
    configure(p)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate_cli import run
    return run(args)


register(("calibrate",), "score labelled prompts, choose refusal thresholds, write report + thresholds.json",
         _configure_calibrate, _run_calibrate)


# ---------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-parser per registered command (nested for multi-word paths)."""
    from . import __version__

    root = argparse.ArgumentParser(prog="rtkern", description="Runtime for language models with refusal tokens.")
    root.add_argument("--version", action="version", version=f"rtkern {__version__}")
    subs: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): root.add_subparsers(dest="command", metavar="COMMAND")}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): root}

    def group(prefix: tuple[str, ...]) -> argparse._SubParsersAction:
        if prefix not in subs:
            parent = group(prefix[:-1])
            gp = parent.add_parser(prefix[-1], help=GROUP_HELP.get(prefix, ""),
                                   description=GROUP_HELP.get(prefix))
            parsers[prefix] = gp
            subs[prefix] = gp.add_subparsers(dest=f"command_{len(prefix)}", metavar="COMMAND")
        return subs[prefix]

    for path in sorted(COMMANDS):
        cmd = COMMANDS[path]
        p = group(path[:-1]).add_parser(path[-1], help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_command=cmd)
    for prefix, gp in parsers.items():
        if prefix:
            gp.set_defaults(_group_parser=gp)
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``rtkern`` console script; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd: Optional[Command] = getattr(args, "_command", None)
    if cmd is None:  # a group (or nothing) was named without a command
        (getattr(args, "_group_parser", None) or parser).print_help(sys.stderr)
        return EXIT_NOT_AVAILABLE
    args._argv_tail = argv[len(cmd.path):]
    return int(cmd.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
