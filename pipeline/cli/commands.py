"""`imagemill` on the command line: a thin layer over the Python API.

Problems the user can fix end as one line on stderr and exit status 2; a job that ran but left
shards failed, or generated no image at all, exits 1; a complete job exits 0; one its budget stopped
(workers.max_gpu_hours, max_cost_usd) exits 3.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from datetime import date
from typing import Any

from imagemill.cli.console import quiet_console
from imagemill.cli.redaction import Unexpected
from imagemill.core.errors import ImagemillError
from imagemill.testing import FAMILIES


def _batch_size(text: str) -> int | str:
    """A number, or `auto` (imagemill.workers.batch_fit)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got '{text}'") from None


# Flags for the fields set most often; every other field is reachable with --set section.field=value.
COMMON_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--input": ("input.path", str, "Parquet file, folder or glob (local or URL)"),
    "--output": ("output.path", str, "output root (local or URL)"),
    "--model": ("model.source", str, "hub id, local directory or URL of a diffusers pipeline"),
    "--batch-size": ("workers.batch_size", _batch_size, "images per model call, or auto (fits the GPU)"),
    "--num-workers": ("workers.num_workers", int, "actors to start (default: one per GPU, or per CPU)"),
    "--image-format": ("output.image_format", str, "png, jpeg or webp"),
    "--quality": ("output.quality", int, "JPEG/WebP quality, 1-100"),
    "--seed": ("generation.seed", int, "job seed that per-row seeds derive from"),
}


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got '{text}'") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagemill", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job spec (YAML); re-running resumes it")
    run.add_argument("spec", help="job spec YAML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any spec field, e.g. --set generation.width=768 (repeatable)",
    )
    for flag, (field, kind, text) in COMMON_FLAGS.items():
        run.add_argument(flag, type=kind, help=f"{text} [{field}]")
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: a progress line every 30 s (the default when stderr is not a terminal)",
    )
    run.add_argument("--date", type=_day, help="the date that fills {date} in the spec (default: today, UTC)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the output of a previous job at the output path (its files only) and start again",
    )
    run.add_argument(
        "--allow-existing",
        action="store_true",
        help="write into an output folder that already holds other files; they are never deleted "
        "[output.allow_existing]",
    )
    run.add_argument(
        "--redo-changed",
        action="store_true",
        help="generate again the rows of input files that changed since their shards were made",
    )

    submit = commands.add_parser("submit", help="run a job spec on a Ray cluster through the Ray Jobs API")
    submit.add_argument("spec", help="job spec YAML file; local inputs and models are sent with the job")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--date", type=_day, help="the date that fills {date} in the spec")
    submit.add_argument("--pip", action="append", default=[], help="a package for the job's environment")
    submit.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    submit.add_argument(
        "--shared-path",
        action="store_true",
        help="the spec's local paths are storage every node mounts at the same place: use them as they are",
    )

    tiny = commands.add_parser("make-tiny-model", help="write a small random-weight pipeline for tests/demos")
    tiny.add_argument("directory")
    tiny.add_argument(
        "--family",
        choices=FAMILIES,
        default="sd",
        help="which pipeline family to build (default: sd)",
    )

    prompts = commands.add_parser("prompts", help="write a prompts Parquet file from a dataset recipe (YAML)")
    prompts.add_argument("recipe", help="recipe YAML: classes, templates, slots, quota, sampling, seed")
    prompts.add_argument("out", help="the Parquet file to write (local or URL)")
    prompts.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    prompts.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec option for OUT"
    )

    status = commands.add_parser("status", help="progress and counts of a job, read from its output")
    status.add_argument("output", help="the job's output root (local or URL)")
    status.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for the output, e.g. endpoint_url=... (repeatable)",
    )
    verify = commands.add_parser(
        "verify",
        help="check images' parameters, C2PA manifests and watermark; exit 0 if all are signed, 1 if any "
        "fails, 3 if some carry only unsigned claims or nothing",
    )
    verify.add_argument("paths", nargs="+", help="image files, folders, tars or data Parquet (local or URL)")
    verify.add_argument("--watermark", metavar="PAYLOAD", help="look for this payload (text, or 0x + hex)")
    verify.add_argument(
        "--watermark-method", default="dwtDctSvd", choices=("dwtDctSvd", "dwtDct"), help="as output.watermark"
    )
    verify.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from imagemill.core.spec import parse_overrides

    overrides = parse_overrides(args.overrides)
    for flag, (field, _, _) in COMMON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append((field, value))
    if args.allow_existing:
        overrides.append(("output.allow_existing", True))
    return overrides


def _run(args: argparse.Namespace) -> int:
    from imagemill.cli.redaction import hiding, job_secrets, redact
    from imagemill.cli.user_errors import as_user_errors
    from imagemill.core.spec import load_spec
    from imagemill.execution.budget import BUDGET_EXIT_STATUS
    from imagemill.execution.runner import run
    from imagemill.reporting.outcome import BUDGET_REACHED, COMPLETE

    spec = load_spec(args.spec, _overrides(args), day=args.date)
    secrets = job_secrets(spec)
    with hiding(secrets), as_user_errors():
        result = run(
            spec, progress=not args.no_progress, overwrite=args.overwrite, redo_changed=args.redo_changed
        )
    print(redact(result.summary(), secrets))  # failed shards' errors come from the storage libraries
    return {COMPLETE: 0, BUDGET_REACHED: BUDGET_EXIT_STATUS}.get(result.state, 1)


def _submit(args: argparse.Namespace) -> int:
    from imagemill.cli.submit import submit

    job_id, state = submit(
        args.spec,
        args.address,
        args.overrides,
        args.date,
        args.pip,
        wait=not args.no_wait,
        shared_path=args.shared_path,
    )
    print(f"submitted {job_id}" if state is None else f"job {job_id}: {state}")
    return 0 if state in (None, "SUCCEEDED") else 1


def _make_tiny_model(args: argparse.Namespace) -> int:
    from imagemill.testing.tiny_families import make_tiny_family

    print(f"tiny model written to {make_tiny_family(args.family, args.directory)}")
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from imagemill.cli.redaction import hiding, values_in
    from imagemill.cli.user_errors import as_user_errors
    from imagemill.core.spec import parse_overrides
    from imagemill.prompts.recipes import write_prompts

    options = dict(parse_overrides(args.storage_option, storage_options=True))
    with hiding(values_in(options)), as_user_errors():
        table = write_prompts(args.recipe, args.out, args.overwrite, options)
    classes = len(set(table["class_name"].to_pylist()))
    print(f"{table.num_rows} prompts of {classes} classes written to {args.out}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from imagemill.cli.redaction import hiding, values_in
    from imagemill.cli.user_errors import as_user_errors
    from imagemill.core.spec import parse_overrides
    from imagemill.reporting.status import job_status

    options = dict(parse_overrides(args.storage_option, storage_options=True))
    with hiding(values_in(options)), as_user_errors():
        report = job_status(args.output, options)
    print(report.text())
    return report.exit_status  # one per state (imagemill.reporting.status.STATUS_EXIT_CODES)


def _verify(args: argparse.Namespace) -> int:
    from imagemill.cli.redaction import hiding, values_in
    from imagemill.cli.user_errors import as_user_errors
    from imagemill.core.spec import parse_overrides
    from imagemill.provenance.verify import verify

    options = dict(parse_overrides(args.storage_option, storage_options=True))
    with hiding(values_in(options)), as_user_errors():
        report = verify(args.paths, options, args.watermark, args.watermark_method)
    print(report.text())
    return report.exit_status


INTERRUPTED_LINE = "imagemill: interrupted; run the same command again to resume"


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM ends the process through SystemExit, so the run can record how it ended: as Ray's own
    driver handler does once Ray is started."""
    raise SystemExit(signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_console()
    args = _parser().parse_args(argv)
    # SIGTERM (`ray job stop`, a pod deleted) ends a run as Ctrl-C does: its record says it was interrupted.
    signal.signal(signal.SIGTERM, _terminate)
    handlers = {
        "run": _run,
        "submit": _submit,
        "make-tiny-model": _make_tiny_model,
        "prompts": _prompts,
        "status": _status,
        "verify": _verify,
    }
    try:
        return handlers[args.command](args)
    except ImagemillError as exc:
        print(f"imagemill: error: {exc}", file=sys.stderr)
        return 2
    except Unexpected as exc:  # a traceback, shown with the storage options' values hidden
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return 128 + signal.SIGINT
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        print(INTERRUPTED_LINE, file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
