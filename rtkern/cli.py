"""The ``rtkern`` command line (console script ``rtkern``, or ``python -m rtkern``).

Commands are registered in `COMMANDS`, keyed by their word path (``("bench", "sampler")``). Each entry
names a function that adds the command's options to its argparse parser and a handler that runs it and
returns the exit status. Handlers import their implementation lazily, so ``rtkern --help`` stays fast
and a command whose dependencies are missing does not break the others.

To add a command, put ``configure(parser)`` and ``run(args) -> int`` in a module and call `register_lazy`::

    register_lazy(("generate",), "generate text with refusal control", ".generate_cli")

Registering a path again replaces the previous entry.
"""
from __future__ import annotations

import argparse
import importlib
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


def register_lazy(path: Sequence[str], help: str, module: str, configure: str = "configure",
                  run: str = "run") -> Command:
    """Register a command whose ``configure(parser)`` / ``run(args)`` live in ``module`` (imported on use)."""
    def conf(p: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module, __package__), configure)(p)

    def go(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module, __package__), run)(args)
    return register(path, help, conf, go)


_BENCHES = {
    "sampler": "fused refusal sampler vs naive PyTorch / CUDA graph / torch.compile / FlashInfer",
    "decode": "decode ms/step and tok/s: rtkern engine vs transformers generate and gpt-fast style",
    "kernels": "decoder Triton kernels (RMSNorm, RoPE+cache, decode attention, SwiGLU) vs torch",
    "score": "first-token refusal scoring throughput: rtkern.scoring.score vs a transformers forward loop",
    "train": "SFT step throughput and peak memory: rtkern trainer vs a transformers training loop",
}
for _name, _help in _BENCHES.items():
    register_lazy(("bench", _name), _help, f".bench.{_name}", "add_arguments", "run_from_args")
register_lazy(("generate",), "generate text with refusal control; prints answers and refusal probabilities",
              ".generate_cli")
register_lazy(("train",), "SFT with refusal tokens (control token as the first assistant token; HF checkpoints)",
              ".train.cli")
register_lazy(("average",), "average the weights of fine-tuned checkpoints of one base (a model soup)",
              ".train.average")
register_lazy(("calibrate",), "score labelled prompts, choose refusal thresholds, write report + thresholds.json",
              ".calibrate_cli")


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
