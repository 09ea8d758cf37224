"""`optg`: run, check and inspect.

Exit codes (stable, for release scripts): 0 ok; 2 config or usage error; 3 a gate failed
(accuracy drop, ONNX parity, N:M pattern); 1 anything else; 130 interrupted (rerun resumes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NoReturn

from pipeline.exit_codes import EXIT_ERROR, EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:  # the CLI imports torch and the stages only when a command needs them
    from stages.train import StepHook


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep its message short
        self.print_usage(sys.stderr)
        print(f"optg: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optg", description="Train sparse with OptG, bake, gate, export and verify 2:4-ready ONNX.")
    parser.add_argument("--version", action="version", version=f"optg {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the pipeline of a config (resumes an interrupted run)")
    run.add_argument("config")
    run.add_argument("--out", type=Path, help="run directory (default runs/<name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value by dotted key, e.g. --set sparsity.target=0.98")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--force", action="store_true",
                     help="start over in a run directory of ours made by another config "
                          "(never clears a directory without an optg manifest)")
    run.add_argument("--nproc", type=_positive_int, metavar="N",
                     help="train with N processes on this node: starts torchrun (torch.distributed.run); "
                          "data.batch_size stays the global batch")

    check = sub.add_parser("check", help="validate a config without running anything")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--print", dest="print_config", action="store_true", help="print the resolved config")
    check.add_argument("--json", action="store_true",
                       help='machine-readable: {"ok": true, "config": ...} or '
                            '{"ok": false, "errors": [{path, message}]}')

    schema = sub.add_parser("schema", help="print the config's JSON Schema (editor completion, CI validation)")
    schema.add_argument("--markdown", action="store_true",
                        help="print the config reference as Markdown instead (docs/config.md)")

    inspect = sub.add_parser("inspect", help="read back weights, sparsity and N:M compliance of any ONNX file")
    inspect.add_argument("model")
    inspect.add_argument("--pattern", help="require this N:M pattern on every eligible weight, e.g. 2:4")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def package_version() -> str:
    """The installed optg-pipeline version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optg-pipeline")
    except PackageNotFoundError:
        import optg

        return optg.__version__


def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    return load_config(args.config, overrides)


def cmd_check(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, config_hash, dump_yaml, resolved_dict

    if args.json:
        try:
            cfg = _load(args)
        except ConfigError as exc:
            print(json.dumps({"ok": False, "config": args.config, "errors": exc.items}, indent=2))
            return EXIT_USAGE
        print(json.dumps({"ok": True, "config_hash": config_hash(cfg), "config": resolved_dict(cfg)}, indent=2))
        return EXIT_OK
    cfg = _load(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
    target = "" if cfg.sparsity.target is None else f" at {cfg.sparsity.target}"
    print(f"{args.config}: ok ({cfg.sparsity.method}, {cfg.sparsity.pattern}{target}; "
          f"config hash {config_hash(cfg)[:12]})")
    return EXIT_OK


def _forwarded(args: argparse.Namespace) -> list[str]:
    """`optg run` arguments for the ranks that `--nproc` starts (all but --nproc)."""
    out = [args.config]
    if args.out is not None:
        out += ["--out", str(args.out)]
    for item in args.overrides:
        out += ["--set", item]
    if args.device:
        out += ["--device", args.device]
    return out + ["--quiet"] * args.quiet + ["--force"] * args.force


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.distributed import batch_problem, env_world_size, init_from_env, launch, shutdown

    cfg = _load(args)
    world = args.nproc or env_world_size()
    if args.nproc and env_world_size() > 1:
        raise ConfigError(["--nproc: this process was already started by torchrun; drop --nproc"])
    problems = [p for p in [batch_problem(cfg.data.batch_size, world)] if p]
    if world > 1 and cfg.structured is not None:
        problems.append("structured: channel pruning runs in one process; run this config without "
                        "torchrun/--nproc (its checkpoints and fine-tune are not rank-aware yet)")
    if problems:
        raise ConfigError(problems, args.config)
    if args.nproc:
        return launch(args.nproc, _forwarded(args), args.out or Path("runs") / cfg.name)
    info = init_from_env(cfg.device)
    try:
        return _run_here(args, cfg, info)
    finally:
        shutdown()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what is written to stdout (Python's `print`, and file descriptor 1 itself: C
    libraries, child processes) to stderr while the block runs."""
    sys.stdout.flush()
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stream (a test's capture): Python level only
        fd = err = None
    saved = os.dup(fd) if fd is not None else None
    if fd is not None and err is not None:
        os.dup2(err, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None and fd is not None:
            os.dup2(saved, fd)
            os.close(saved)


def _run_here(args: argparse.Namespace, cfg, info) -> int:
    """Run the pipeline in this process (one rank of it under torchrun)."""
    from pipeline.runner import Runner, RunOptions
    from stages.base import GateFailure

    quiet = args.quiet or not info.writer  # one rank speaks for the job
    options = RunOptions(out=args.out, force=args.force, quiet=quiet,
                         progress=not quiet and sys.stderr.isatty(), dist=info,
                         command=[sys.argv[0], *args.argv], on_step=args.on_step)
    runner = Runner(cfg, options)
    try:
        with stdout_to_stderr():  # stdout carries the JSON summary alone, whatever a plugin prints
            manifest = runner.execute()
    except GateFailure as exc:
        print(f"optg: gate failed ({exc.gate}): {exc}", file=sys.stderr)
        print(f"optg: see {runner.run.path / 'report.md'} and manifest.json", file=sys.stderr)
        return EXIT_GATE
    if not info.writer:
        return EXIT_OK
    m = manifest.metrics
    summary: dict[str, object] = {"status": manifest.status, "run_dir": str(runner.run.path), "task": m.task}
    if m.metric == "perplexity":
        summary.update(dense_perplexity=m.dense_perplexity, sparse_perplexity=m.sparse_perplexity)
    else:
        summary.update(dense_accuracy=m.dense_accuracy, sparse_accuracy=m.sparse_accuracy)
    summary.update(targeted_sparsity=m.targeted_sparsity, parity_max_abs_error=m.parity_max_abs_error)
    if not args.quiet:
        print(json.dumps(summary, indent=2))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """The config schema: JSON Schema, or with --markdown the generated reference (docs/config.md)."""
    if args.markdown:
        from pipeline.config_docs import render_markdown

        sys.stdout.write(render_markdown())
        return EXIT_OK
    from pipeline.config import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect_cmd import run_inspect

    return run_inspect(args.model, args.pattern, args.json, sys.stdout)


def main(argv: list[str] | None = None, *, on_step: StepHook | None = None) -> int:
    """The `optg` command line; `on_step` is passed to a run's trainers (see `RunOptions`)."""
    from pipeline.config import ConfigError
    from pipeline.rundir import RunDirConflict
    from stages.base import StageConfigError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.on_step = on_step
    handler = {"run": cmd_run, "check": cmd_check, "inspect": cmd_inspect,
               "schema": cmd_schema}[args.command]
    try:
        return handler(args)
    except (ConfigError, RunDirConflict, StageConfigError) as exc:
        print(f"optg: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("optg: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the top of the CLI: one clear line, no traceback
        print(f"optg: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def entry() -> None:
    """The `optg` command and `python -m pipeline.cli` (what torchrun starts on every rank): a
    rank of a multi-process job ends through `end_rank_process` (see there why), one process
    through `sys.exit`."""
    from pipeline.distributed import end_rank_process, env_world_size

    code = main()
    if env_world_size() > 1:
        end_rank_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
