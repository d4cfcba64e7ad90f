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


def _cmd_ckpt_list(args: argparse.Namespace) -> int:
    from gradguard.ckpt import tools

    return tools.list_command(args.root, as_json=args.json)


def _cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from gradguard.ckpt import tools

    return tools.inspect_command(args.path, as_json=args.json)


def _cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from gradguard.ckpt import tools

    return tools.verify_command(args.path, key_file=args.key_file)


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

    ckpt = commands.add_parser("ckpt", help="list, inspect and verify checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)
    ckpt_list = ckpt_commands.add_parser("list", help="the committed checkpoints under ROOT")
    ckpt_list.add_argument("root", metavar="ROOT", help="checkpoint root (directory or URL)")
    ckpt_list.add_argument("--json", action="store_true", help="print JSON")
    ckpt_list.set_defaults(func=_cmd_ckpt_list)
    ckpt_inspect = ckpt_commands.add_parser(
        "inspect", help="step, config, optimizer and sizes of the checkpoint at PATH")
    ckpt_inspect.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    ckpt_inspect.add_argument("--json", action="store_true", help="print JSON")
    ckpt_inspect.set_defaults(func=_cmd_ckpt_inspect)
    ckpt_verify = ckpt_commands.add_parser(
        "verify", help="verify every file (and the signature) of PATH; exit 0 if good, 1 if not")
    ckpt_verify.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    ckpt_verify.add_argument("--key-file", help="signing key file (default: GRADGUARD_CKPT_KEY "
                             "or GRADGUARD_CKPT_KEY_FILE)")
    ckpt_verify.set_defaults(func=_cmd_ckpt_verify)
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
