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


def _cmd_compare(args: argparse.Namespace) -> int:
    from gradguard.compare import CompareError, run_compare
    from gradguard.compare.report import text_summary

    try:
        result = run_compare(args.config, optimizers=args.optimizers, variants=args.variant,
                             seeds=args.seeds, output=args.output, workers=args.workers,
                             target=args.target, overrides=args.set, overwrite=args.overwrite,
                             log=None if args.quiet else print)
    except CompareError as exc:
        print(f"gradguard compare: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradguard compare: interrupted; run the same command again to continue",
              file=sys.stderr)
        return 130
    print(text_summary(result.summary))
    print(f"summary: {result.output / 'summary.json'}")
    print(f"report: {result.report}")
    return result.exit_code


def _cmd_gate(args: argparse.Namespace) -> int:
    from gradguard.compare import GateError, gate

    directions = {}
    for item in args.direction:
        name, sep, mode = item.partition("=")
        if not sep or mode not in ("min", "max"):
            print(f"gradguard gate: --direction {item!r}: write METRIC=min or METRIC=max",
                  file=sys.stderr)
            return 2
        directions[name] = mode
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    try:
        result = gate(args.baseline, args.candidate, args.eval, max_drop=args.max_drop,
                      directions=directions, metrics=metrics, overrides=args.set,
                      key_file=args.key_file)
    except GateError as exc:
        print(f"gradguard gate: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        print(f"written: {result.save(args.json)}")
    return result.exit_code


def _cmd_sweep(args: argparse.Namespace) -> int:
    from gradguard.compare import SweepError, run_sweep

    try:
        result = run_sweep(args.config, args.space, trials=args.trials, output=args.output,
                           storage=args.storage, study_name=args.study_name,
                           overrides=args.set, objective=args.objective, pruner=args.pruner,
                           seed=args.seed, log=None if args.quiet else print)
    except SweepError as exc:
        print(f"gradguard sweep: {exc}", file=sys.stderr)
        return 2
    if result.best_config is None:
        print("gradguard sweep: no trial completed; no best config", file=sys.stderr)
    return result.exit_code


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

    compare = commands.add_parser(
        "compare", help="train every (optimizer, seed) pair and compare them with statistics")
    compare.add_argument("config", metavar="CONFIG", help="the base TOML config")
    compare.add_argument("--optimizers", metavar="A,B,...",
                         help="optimizer names, one variant each (default hyperparameters)")
    compare.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE",
                         help="a config override for variant NAME (repeatable; NAME may be one "
                         "of --optimizers)")
    compare.add_argument("--seeds", default="3", metavar="N|S1,S2,...",
                         help="number of seeds (from run.seed) or the seeds (default 3)")
    compare.add_argument("--workers", type=int, metavar="N",
                         help="parallel worker processes (default: one per core)")
    compare.add_argument("--output", metavar="DIR",
                         help="compare directory (default runs/<config name>-compare)")
    compare.add_argument("--target", type=float, metavar="VALUE",
                         help="primary-metric target for time-to-target (default: the "
                         "workload's)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a value of the base config (repeatable)")
    compare.add_argument("--overwrite", action="store_true",
                         help="delete the compare directory first instead of resuming it")
    compare.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    compare.set_defaults(func=_cmd_compare)

    gate_cmd = commands.add_parser(
        "gate", help="evaluate two checkpoints on the same data; exit 1 on a regression")
    gate_cmd.add_argument("--baseline", required=True, metavar="A",
                          help="checkpoint, run directory, or evaluation record (.json, "
                          "GATE.json:candidate)")
    gate_cmd.add_argument("--candidate", required=True, metavar="B", help="same forms as A")
    gate_cmd.add_argument("--eval", metavar="CONFIG",
                          help="the evaluation config (workload, seed, precision)")
    gate_cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a value of the evaluation config (repeatable)")
    gate_cmd.add_argument("--max-drop", default="0.5%", metavar="X%|X",
                          help="allowed worsening per metric: a percentage of the baseline or "
                          "an absolute amount (default 0.5%%)")
    gate_cmd.add_argument("--metrics", metavar="A,B", help="gate only these metrics")
    gate_cmd.add_argument("--direction", action="append", default=[], metavar="METRIC=min|max",
                          help="direction of a metric whose name does not tell (repeatable)")
    gate_cmd.add_argument("--json", default="gate.json", metavar="PATH",
                          help="write the result here (default gate.json; '' for none)")
    gate_cmd.add_argument("--key-file", help="signing key file of signed checkpoints")
    gate_cmd.set_defaults(func=_cmd_gate)

    sweep = commands.add_parser(
        "sweep", help="an Optuna hyperparameter sweep; continues after a kill")
    sweep.add_argument("config", metavar="CONFIG", help="the base TOML config")
    sweep.add_argument("--space", required=True, metavar="SPACE.toml",
                       help="the search space (docs/compare.md)")
    sweep.add_argument("--trials", type=int, required=True, metavar="N",
                       help="finished (complete or pruned) trials the study should have")
    sweep.add_argument("--output", metavar="DIR",
                       help="sweep directory (default runs/<config name>-sweep)")
    sweep.add_argument("--storage", metavar="URL|FILE",
                       help="an Optuna RDB URL or a journal file (default DIR/study.db)")
    sweep.add_argument("--study-name", metavar="NAME", help="default: the sweep directory's name")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the base config (repeatable)")
    sweep.add_argument("--objective", choices=("final", "best"), default="final",
                       help="the primary metric at the end of each trial, or its best")
    sweep.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    sweep.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sweep.set_defaults(func=_cmd_sweep)

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
