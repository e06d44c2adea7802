"""The ``drop-upcycling`` command.

Each subcommand lives in the module that does the work and exposes two functions,
``configure_parser(parser)`` and ``run(args) -> int``. Only the chosen subcommand's module is
imported, so ``drop-upcycling --help`` stays fast and a broken optional dependency of one
command does not break the others. Adding a command is one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import run_command

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("drop_upcycling.data", "corpus -> JSONL splits -> BPE tokenizer -> datatrove .ds shards (or all: prepare)"),
    "upcycle": ("drop_upcycling.upcycle", "turn a dense Llama checkpoint into a Mixtral MoE (FS, NU, RNU, DU, BTX)"),
    "evaluate": ("drop_upcycling.evaluate", "score checkpoints with lm-evaluation-harness (local offline suite, paper suite)"),
    "routing": ("drop_upcycling.count_routing", "count top-k expert choices per domain of a MoE checkpoint (CSV)"),
    "analyze": ("drop_upcycling.analyze", "analyses of finished artifacts: analyze routing (Figure 5) | curves (loss curves)"),
    "report": ("drop_upcycling.report", "the reproduction report of a run directory: figures, tables, findings"),
    "flops": ("drop_upcycling.flops", "parameters and training FLOPs per model; the paper's FLOPs table"),
    "train": ("drop_upcycling.train", "train a dense or MoE model (data x expert parallel, torchrun), resumable"),
    "demo": ("drop_upcycling.demo", "make a tiny dense model and upcycle it by every method (a quick install check)"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drop-upcycling",
        description="Drop-Upcycling reproducibility suite.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see the list below")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    verbose = "-v" in argv[:1] or "--verbose" in argv[:1]
    if verbose:
        argv = argv[1:]
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints the usage error and exits 2
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"drop-upcycling {name}", description=COMMANDS[name][1])
    module.configure_parser(parser)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return run_command(f"drop-upcycling {name}", lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
