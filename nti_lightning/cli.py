"""``nti``: the command line.

  nti invert [--images DIR_OR_FILES ...] [--captions FILE] [--output DIR] [--model SPEC] [--config YAML] [key=value ...]
  nti status OUTPUT

Exit status of ``nti invert`` (``EXIT_*`` below): 0 every image inverted; 3 some images failed (the others are
done; the manifest and ``nti status`` list them); 4 every image failed; 1 an error stopped the run (also:
another rank that this process launched failed); 2 configuration error, an output folder made with other
settings, or one in use by another run; 75 preempted by SIGTERM/SIGUSR1/SIGUSR2 with the state saved, on any
rank (rerun to resume); 130 Ctrl-C, state saved.
  nti edit INVERSION --target "..." [...]     (Prompt-to-Prompt, see ``nti edit --help``)
  nti edit OUTPUT --edits EDITS.jsonl [...] [key=value ...]   (an edits file over a run: resumable, shardable)
  nti eval DIR --methods ddim,nti,npi,proxnpi,direct --out OUT [...] [key=value ...]   (PIE-Bench-format, docs/eval.md)

``nti invert`` with no input inverts the bundled sample images with the embedded tiny model.
Overrides are OmegaConf dotlist keys of the command's typed config (``RunConfig`` for invert,
``eval.config.EvalConfig``, ``jobs.edit_config.EditRunConfig``: ``inversion.num_inner_steps=5``,
``trainer.precision=bf16-mixed``); unknown keys are an error naming the key; flags are aliases of keys.
"""

from __future__ import annotations

import argparse
import os
import sys

from nti_lightning.data.ids import printable
from nti_lightning.exit_codes import (
    EXIT_ALL_FAILED,
    EXIT_CONFIG_ERROR,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_IO_ERROR,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_SOME_FAILED,
)


def build_parser() -> argparse.ArgumentParser:
    from nti_lightning import __version__
    from nti_lightning.edit_args import add_edit_subparser
    from nti_lightning.eval.args import add_eval_subparser

    parser = argparse.ArgumentParser(prog="nti", description="Null-text Inversion and Prompt-to-Prompt editing")
    parser.add_argument("--version", action="version", version=f"nti_lightning {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: NTI_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    inv = sub.add_parser("invert", help="invert a folder or list of images (default: the bundled samples)")
    inv.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="files, folders (recursive), .jsonl/.csv/.txt lists, .tar/.parquet shards, folders of them or "
        "brace patterns ('shards/{00000..00099}.tar')",
    )
    inv.add_argument("--captions", default=None, help="JSONL or CSV with columns image, prompt")
    inv.add_argument("--output", default=None, help="output folder (default: outputs/nti)")
    inv.add_argument(
        "--config", default=None, help="YAML config file, or a packaged config by name (paper, fast_cpu, sd2, sdxl)"
    )
    inv.add_argument(
        "--model",
        default=None,
        help="model.spec: 'tiny', 'tiny-sd2-v', 'tiny-sdxl', a diffusers folder (SD1.x / SD2.x / SDXL, detected) or "
        "a .safetensors / .ckpt file (with model.config_dir=)",
    )
    inv.add_argument("--overwrite", action="store_true", help="start over an output folder made with other settings")
    inv.add_argument("--retry-failed", action="store_true", help="re-do images recorded as failed")
    inv.add_argument("--quiet", action="store_true", help="no per-image log lines")
    inv.add_argument("overrides", nargs="*", help="key=value config overrides")

    st = sub.add_parser("status", help="summarise done / failed / pending of an output folder")
    st.add_argument("output", help="the folder of an `nti invert` or `nti eval` run, or OUTPUT/edits of an edit job")

    add_edit_subparser(sub)
    add_eval_subparser(sub)
    parser.commands = sub.choices  # name → its parser: errors in a command's arguments show that command's usage
    return parser


def cmd_invert(args) -> int:
    from nti_lightning.config import ConfigError, load_config
    from nti_lightning.jobs.invert import run_inversion
    from nti_lightning.jobs.invert_outputs import format_header, format_row

    try:
        cfg = load_config(args.config, invert_overrides(args))
    except ConfigError as e:
        print(f"nti invert: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    summary = run_job_command("invert", lambda: run_inversion(cfg, overwrite=args.overwrite,
                              retry_failed=args.retry_failed, quiet=args.quiet, argv=args.argv))  # fmt: skip
    if isinstance(summary, int):
        return summary
    if summary.rank != 0:  # a rank launched by rank 0, which reports the whole run; its rows are in its log
        return EXIT_PREEMPTED if summary.preempted else exit_status(summary, quiet=True)
    rows = summary.done + summary.failed
    if rows and args.quiet:  # without --quiet the rows were printed as the images finished
        print(format_header(summary.method))
        for rec in rows:
            print(printable(format_row(rec)))
        if len(rows) < summary.n_done + summary.n_failed:
            print(f"(the first {len(rows)} rows; all of them are in the manifest, `nti status` lists the failures)")
    before = f" ({summary.skipped_failed} of them failed before)" if summary.skipped_failed else ""
    print(
        f"{summary.n_done} inverted, {summary.n_failed} failed, {summary.skipped} already done{before} "
        f"→ {summary.output}/manifest*.jsonl"
    )
    if summary.preempted or summary.interrupted:
        how = "interrupted" if summary.interrupted else "preempted"
        print(f"{how}: state saved under {summary.output}/checkpoints; rerun the same command to resume")
        return EXIT_INTERRUPTED if summary.interrupted else EXIT_PREEMPTED
    return exit_status(summary)


def invert_overrides(args) -> list[str]:
    """``nti invert``'s dotlist: the key=value arguments, then its flags as the keys they set."""
    overrides = list(args.overrides)
    if args.images:
        overrides.append("data.images=[" + ",".join(_quote(p) for p in args.images) + "]")
    if args.captions:
        overrides.append(f"data.captions={_quote(args.captions)}")
    if args.output:
        overrides.append(f"output.dir={_quote(args.output)}")
    if args.model:
        overrides.append(f"model.spec={_quote(args.model)}")
    return overrides


def exit_status(summary, quiet: bool = False) -> int:
    """0 all done, 3 some failed, 4 all failed — counting images skipped as failed by earlier runs too; unless
    ``quiet``, a failure gets one line on stderr saying where to look."""
    failed = summary.n_failed + summary.skipped_failed
    ok = summary.n_done + summary.skipped - summary.skipped_failed
    code = EXIT_OK if failed == 0 else EXIT_SOME_FAILED if ok else EXIT_ALL_FAILED
    if quiet or code == EXIT_OK:
        return code
    if code == EXIT_ALL_FAILED:
        print(f"every image failed ({failed}); `nti status {summary.output}` lists why", file=sys.stderr)
    else:
        print(
            f"{failed} image(s) failed; `nti status {summary.output}` lists them, --retry-failed redoes them (an "
            "image whose prompt changed since it failed is retried anyway)",
            file=sys.stderr,
        )
    return code


def cmd_eval(args) -> int:
    from nti_lightning.config import ConfigError
    from nti_lightning.eval.config import config_from_args

    try:
        cfg = config_from_args(args)
    except (ConfigError, ValueError) as e:
        print(f"nti eval: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from nti_lightning.jobs.eval import run_eval

    return run_and_report(
        "eval",
        lambda: run_eval(cfg, overwrite=args.overwrite, quiet=args.quiet, argv=args.argv),
        "pair(s)",
        lambda s: (
            f"{s.n_done} pair(s) evaluated, {s.n_failed} failed, {s.skipped} already done → {cfg.output.dir}/summary.md"
        ),
    )


def cmd_edit(args) -> int:
    """``nti edit``: one edit (``p2p.cli.run_single``), or an edits file over a run (the job ``jobs.edit``)."""
    from nti_lightning.config import ConfigError
    from nti_lightning.edit_args import run_config_from_args
    from nti_lightning.p2p.cli import EDIT_ERRORS, run_single

    try:
        if args.edits and (args.blend or args.reweight):
            raise ValueError('--blend and --reweight are per edit in the batch form: give "blend"/"reweight" per line')
        cfg = run_config_from_args(args)
        if not args.edits:
            return run_single(args, cfg.edit, cfg.model.spec, cfg.model.config_dir)
    except (ConfigError, *EDIT_ERRORS) as e:
        print(f"nti edit: {printable(e)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from nti_lightning.jobs.edit import run_edits

    return run_and_report(
        "edit",
        lambda: run_edits(cfg, quiet=args.quiet, argv=args.argv),
        "line(s)",
        lambda s: f"{s.n_done} edited, {s.n_failed} failed, {s.skipped} already done → {s.output}/results.jsonl",
    )


def run_job_command(name: str, run):
    """``run()`` → its summary, or the exit status of the errors every job reports in one line."""
    from nti_lightning.run.claim import ClaimLostError, OutputLockedError
    from nti_lightning.run.folder import OutputMismatchError
    from nti_lightning.run.launch import RankFailedError

    try:
        return run()
    except (OutputMismatchError, OutputLockedError, ClaimLostError) as e:
        print(f"nti {name}: {printable(e)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RankFailedError as e:  # another rank launched by this process failed (this one finished)
        print(f"nti {name}: {e}", file=sys.stderr)
        return EXIT_ERROR


def run_and_report(name: str, run, what: str, done_line) -> int:
    """A job of the run layer (eval, edit) end to end: ``run_job_command``, then rank 0 prints ``done_line(summary)``;
    the exit status of ``job_exit_status``."""
    summary = run_job_command(name, run)
    if isinstance(summary, int):
        return summary
    if summary.rank == 0:
        print(done_line(summary))
    return job_exit_status(summary, what, quiet=summary.rank != 0)


def job_exit_status(summary, what: str, quiet: bool = False) -> int:
    """75 preempted, 130 interrupted (rerun to resume); else 0 / 3 some failed / 4 all failed (failed units are
    retried by a rerun)."""
    if summary.preempted or summary.interrupted:
        if not quiet:
            print(f"{'interrupted' if summary.interrupted else 'preempted'}: rerun the same command to resume")
        return EXIT_INTERRUPTED if summary.interrupted else EXIT_PREEMPTED
    if not summary.n_failed:
        return EXIT_OK
    if not quiet:
        print(f"{summary.n_failed} {what} failed; `nti status {summary.output}` lists why; a rerun retries them",
              file=sys.stderr)  # fmt: skip
    return EXIT_SOME_FAILED if summary.n_done + summary.skipped else EXIT_ALL_FAILED


def cmd_status(args) -> int:
    from nti_lightning.run.status import print_status

    return print_status(args.output)


def _quote(value: str) -> str:
    """Quote a value for an OmegaConf dotlist so paths with ':' ',' or spaces survive."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``nti``'s arguments (exits 2 with the command's usage on a bad one); the key=value overrides of ``invert``,
    ``eval`` and ``edit`` may come after their flags too. ``args.argv``: the command line itself (the ranks a
    multi-device run starts run this same command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if args.command in ("invert", "eval", "edit"):  # key=value overrides anywhere on the line
        bad = [e for e in extra if "=" not in e or e.startswith("-")]
        if bad:
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    debug = args.debug or os.environ.get("NTI_DEBUG") == "1"
    # a quiet console: transformers' import-time notices (e.g. "requires torchvision") are not the user's concern
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        print("nti: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a user mistake or a failure: one line, the traceback only with --debug
        if debug:
            raise
        print(f"nti {args.command}: {type(e).__name__}: {printable(e)} (--debug shows the traceback)", file=sys.stderr)
        return error_code(e)


def error_code(e: BaseException) -> int:
    """A path, value or device that is not there is the user's to fix (2); any other file-system error while
    running — disk full, a read-only folder — is a runtime I/O error (74); anything else an error (1)."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)):
        return EXIT_CONFIG_ERROR
    if isinstance(e, OSError):
        return EXIT_IO_ERROR
    return EXIT_ERROR


def dispatch(args) -> int:
    if args.command == "invert":
        return cmd_invert(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "edit":
        return cmd_edit(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
