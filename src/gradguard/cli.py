"""The ``gradguard`` command. Thin: it parses arguments and calls the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradguard import __version__


def _cmd_optimizers(args: argparse.Namespace) -> int:
    from gradguard.optim import registry

    names = registry.available()
    width = max(len(n) for n in names)
    for name in names:
        cls = registry.get(name)
        impls = ",".join(cls.supported_impls)
        print(f"{name:<{width}}  {registry.summary(name)}  [impl: auto,{impls}]")
        if args.verbose:
            for key, default in registry.hyperparameters(name).items():
                print(f"{'':<{width}}    {key}={default!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Gradient-descent optimizers for PyTorch that you can operate in production.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    optimizers = commands.add_parser("optimizers", help="list the optimizer registry")
    optimizers.add_argument("-v", "--verbose", action="store_true",
                            help="also list each optimizer's hyperparameters and defaults")
    optimizers.set_defaults(func=_cmd_optimizers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
