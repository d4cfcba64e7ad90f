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


def _cmd_train(args: argparse.Namespace) -> int:
    from gradguard.run import ConfigError, RunDirectoryError, config, train

    try:
        cfg = config.load(args.config, args.set)
        if args.output:
            cfg.run.output = args.output
        result = train(cfg, resume=args.resume, overwrite=args.overwrite,
                       progress=False if args.quiet else None)
    except (ConfigError, RunDirectoryError) as exc:
        print(f"gradguard train: {exc}", file=sys.stderr)
        return 2
    return result.exit_code


def _cmd_config_check(args: argparse.Namespace) -> int:
    from gradguard.run import ConfigError, config

    try:
        cfg = config.load(args.file, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: ok (workload {cfg.workload.name}, run directory {cfg.run.output})")
    return 0


def _cmd_config_example(args: argparse.Namespace) -> int:
    from gradguard.run.examples import example

    try:
        print(example(args.workload), end="")
    except ValueError as exc:
        print(f"gradguard config example: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from gradguard.report import build_report

    try:
        path = build_report(args.run_dir, args.output)
    except (FileNotFoundError, ValueError) as exc:
        print(f"gradguard report: {exc}", file=sys.stderr)
        return 1
    print(path)
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

    train_cmd = commands.add_parser(
        "train", help="train a workload from a TOML config; writes a run directory and a report")
    train_cmd.add_argument("config", metavar="CONFIG", help="the run's TOML config")
    train_cmd.add_argument("--resume", action="store_true",
                           help="continue the run in run.output from its newest good checkpoint")
    train_cmd.add_argument("--overwrite", action="store_true",
                           help="replace an existing run directory")
    train_cmd.add_argument("--output", metavar="DIR", help="run directory (overrides run.output)")
    train_cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set train.steps=100 (repeatable)")
    train_cmd.add_argument("-q", "--quiet", action="store_true",
                           help="no progress bar: only events and the summary")
    train_cmd.set_defaults(func=_cmd_train)

    cfg = commands.add_parser("config", help="check a config, or print a commented example")
    cfg_commands = cfg.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = cfg_commands.add_parser("check", help="validate FILE; exit 0 if it can run, 1 if not")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value before checking (repeatable)")
    check.set_defaults(func=_cmd_config_check)
    example = cfg_commands.add_parser("example", help="print a commented config for WORKLOAD")
    example.add_argument("workload", metavar="WORKLOAD",
                         help="ctr, digits, mnist1d, quadratic, rosenbrock, or module:factory")
    example.set_defaults(func=_cmd_config_example)

    report = commands.add_parser("report", help="(re)build RUN_DIR/report.html")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("-o", "--output", help="write the report here instead")
    report.set_defaults(func=_cmd_report)
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
