"""The ``lgc-fast`` command. Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args)``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help); modules are imported only when their subcommand runs or help is built.
COMMANDS = {
    "info": ("lgc_fast.info", "print versions and which backends are available"),
    "train": ("lgc_fast.train", "train the network on a 300-W style folder (resumable; runs under torchrun)"),
    "eval": ("lgc_fast.evaluate", "landmark errors (NME, failure rate, AUC, CED plot) of a checkpoint on a folder"),
    "predict": ("lgc_fast.predict", "landmarks for images (JSON, overlay PNG, optional .pts), with or without boxes"),
    "demo": ("lgc_fast.demo", "run the bundled model on the bundled astronaut image (offline, CPU)"),
    "export": ("lgc_fast.export", "export the network to ONNX (standard ops) and check it with onnxruntime"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgc-fast", description="Local-Global Context Network for facial landmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _interrupted() -> int:
    print("lgc-fast: interrupted", file=sys.stderr)
    return 130


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)  # imports torch: seconds in which a Ctrl-C is likely too
    except KeyboardInterrupt:
        return _interrupted()
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return _interrupted()
    except (ValueError, TypeError, OSError) as exc:  # LgcError is a ValueError
        if os.environ.get("LGC_FAST_DEBUG") == "1":
            raise
        print(f"lgc-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
