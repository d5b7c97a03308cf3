"""The `zenith-onnx` command line (also `python -m zenith_onnx`).

Exit codes: 0 success, 1 `diff` found differences, 2 bad input or usage (one line on
stderr naming the file, tensor or node), 3 an internal error (one line; `--traceback`
shows it in full). The input file is never modified; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from zenith_onnx.errors import UsageError, ZenithError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        where = self.prog.removeprefix("zenith-onnx").strip()
        raise UsageError(f"{where}: {message}" if where else message)


def _add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="run float-preserving graph passes (BatchNorm folding, cleanup)")
    p.add_argument("model", nargs="?", help="input .onnx model")
    p.add_argument("-o", "--output", help="output .onnx model")
    p.add_argument("--passes", help="comma-separated pass names (default: %(default)s)", default=None)
    p.add_argument("--list-passes", action="store_true", help="list the available passes and exit")
    p.set_defaults(handler=_cmd_optimize)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="op counts, inputs/outputs, opset, weight size; --fusion: what ORT fuses")
    p.add_argument("model")
    p.add_argument("--fusion", action="store_true", help="load in onnxruntime (ORT_ENABLE_EXTENDED) and report fused ops")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_cmd_inspect)


def _add_diff(sub) -> None:
    p = sub.add_parser("diff", help="structural (and numeric with --data) diff; exit 0 same, 1 different")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--data", help="calibration .npz: also run both models and compare outputs")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance for initializers and outputs")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_diff)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: $ZENITH_ONNX_THREADS, else 1; 0: one per physical core)")


def _add_calibrate(sub) -> None:
    from zenith_onnx.qconfig import CALIBRATION_METHODS, DEFAULT_METHOD

    p = sub.add_parser("calibrate", help="observe activation ranges on calibration data, write ranges JSON")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration .npz (one array per graph input, samples on axis 0)")
    p.add_argument("-o", "--output", required=True, help="ranges .json")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=CALIBRATION_METHODS, help="range method (default: %(default)s)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default: %(default)s)")
    p.add_argument("--activation-bits", type=int, default=8, choices=(8, 16), help="for entropy and mse")
    p.add_argument("--batch-size", type=int, default=1, help="samples per onnxruntime run (needs a symbolic axis 0)")
    _add_threads(p)
    p.set_defaults(handler=_cmd_calibrate)


def _add_quantize(sub) -> None:
    from zenith_onnx.qconfig import DEFAULT_METHOD, FALLBACK_METHOD

    p = sub.add_parser("quantize", help="fold, calibrate and insert Q/DQ that onnxruntime fuses")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="calibration .npz")
    src.add_argument("--ranges", help="ranges .json from `zenith-onnx calibrate`")
    p.add_argument("--weight-bits", type=int, default=8, choices=(8, 4))
    p.add_argument("--activation-bits", type=int, default=8, choices=(8, 16))
    ch = p.add_mutually_exclusive_group()
    ch.add_argument("--per-channel", dest="per_channel", action="store_true", default=True)
    ch.add_argument("--per-tensor", dest="per_channel", action="store_false")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric-weights", dest="symmetric_weights", action="store_true", default=True)
    sym.add_argument("--asymmetric-weights", dest="symmetric_weights", action="store_false")
    p.add_argument("--method", default=None,
                   help=f"calibration method with --data (default: {DEFAULT_METHOD}; with --auto-fallback {FALLBACK_METHOD})")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="node names or op types to keep in float")
    p.add_argument("--report", help="write the accuracy report as JSON here")
    p.add_argument("--auto-fallback", action="store_true",
                   help="keep the layers that cost the most accuracy in float (needs --data)")
    p.add_argument("--fallback-goal-db", type=float, default=30.0, metavar="DB",
                   help="output SQNR on the calibration data to reach (default %(default)s)")
    p.add_argument("--max-float-nodes", type=int, default=16, metavar="N",
                   help="at most this many nodes kept float (default %(default)s)")
    _add_threads(p)
    p.set_defaults(handler=_cmd_quantize)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run a demo: digits (default) or sine (needs the qat extra)")
    p.add_argument("name", nargs="?", default="digits", choices=("digits", "sine"))
    p.add_argument("--out", default=None, help="output folder (default: ./demo-out/NAME)")
    p.add_argument("--quick", action="store_true", help="a fast, smaller run")
    p.set_defaults(handler=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zenith-onnx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log what the passes do (-vv: debug, with every refused pattern and why)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_optimize, _add_inspect, _add_diff, _add_calibrate, _add_quantize, _add_demo):
        add(sub)
    return parser


# ------------------------------------------------------------------ handlers


def _require(value, flag: str, command: str):
    if not value:
        raise UsageError(f"{command}: {flag} is required")
    return value


def _check_output(inp: str, out: str) -> None:
    """Refuse an output that would overwrite the input or cannot be written, before any work."""
    import os

    if Path(out).resolve() == Path(inp).resolve():
        raise UsageError(f"{out}: the output would overwrite the input; choose another path")
    folder = Path(out).resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{out}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{out}: cannot write to folder '{folder}' (Permission denied)")


def _cmd_optimize(args) -> int:
    from zenith_onnx import passes
    from zenith_onnx.modelio import load_model, save_model

    if args.list_passes:
        for spec in passes.available():
            tag = "" if spec.float_preserving else "  [changes numerics]"
            tag += "" if spec.standalone else " [run by quantize]"
            print(f"{spec.name:<22} {spec.summary}{tag}")
        print(f"\ndefault pipeline: {','.join(passes.DEFAULT_OPTIMIZE)}")
        return EXIT_OK
    model_path = _require(args.model, "MODEL", "optimize")
    out = _require(args.output, "-o/--output", "optimize")
    _check_output(model_path, out)
    names = args.passes.split(",") if args.passes else list(passes.DEFAULT_OPTIMIZE)
    pipeline = passes.build_pipeline(names)
    model = load_model(model_path)
    before = _op_counts(model)
    start = time.perf_counter()
    pipeline(model)
    elapsed = time.perf_counter() - start
    save_model(model, out)
    after = _op_counts(model)
    _print_op_table(before, after)
    _print_pass_reports(pipeline)
    print(f"{model_path} -> {out}: passes {','.join(names)} in {elapsed:.2f} s")
    return EXIT_OK


def _print_pass_reports(pipeline) -> None:
    # Passes that keep a report (fold_batchnorm: each BatchNormalization it did not
    # fold, and why) print it after the op table.
    for pass_ in pipeline.passes:
        if hasattr(pass_, "report_lines"):
            print("\n".join(pass_.report_lines()))


def _op_counts(model) -> dict[str, int]:
    from zenith_onnx.summary import op_counts

    return op_counts(model)


def _print_op_table(before: dict[str, int], after: dict[str, int]) -> None:
    ops = sorted(set(before) | set(after))
    changed = [op for op in ops if before.get(op, 0) != after.get(op, 0)]
    if not changed:
        print("no op counts changed")
        return
    print(f"{'op':<28}{'before':>8}{'after':>8}")
    for op in changed:
        print(f"{op:<28}{before.get(op, 0):>8}{after.get(op, 0):>8}")


def _cmd_inspect(args) -> int:
    from zenith_onnx.modelio import load_model
    from zenith_onnx.summary import summarize

    model = load_model(args.model)
    summary = summarize(model)
    fusion = None
    if args.fusion:
        from zenith_onnx.fusion import fusion_report

        fusion = fusion_report(args.model)  # onnxruntime reads the user's file as it is
    if args.json:
        import json

        data = summary.to_dict()
        if fusion is not None:
            data["fusion"] = fusion.to_dict()
        print(json.dumps(data, indent=2))
    else:
        print(summary.format())
        if fusion is not None:
            print()
            print(fusion.format())
    return EXIT_OK


def _cmd_diff(args) -> int:
    from zenith_onnx.diff import diff_files

    report = diff_files(args.a, args.b, data=args.data, rtol=args.rtol, atol=args.atol)
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return EXIT_OK if report.same else EXIT_DIFFERENT


def _cmd_calibrate(args) -> int:
    from zenith_onnx.calibration import calibrate_file

    calibrate_file(
        args.model,
        args.data,
        args.output,
        method=args.method,
        percentile=args.percentile,
        activation_bits=args.activation_bits,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    return EXIT_OK


def _cmd_quantize(args) -> int:
    from zenith_onnx.qconfig import DEFAULT_METHOD, FALLBACK_METHOD, QuantConfig
    from zenith_onnx.quantize import quantize_file

    _check_output(args.model, args.output)
    config = QuantConfig(
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        per_channel=args.per_channel,
        symmetric_weights=args.symmetric_weights,
        method=args.method or (FALLBACK_METHOD if args.auto_fallback else DEFAULT_METHOD),
        exclude=tuple(args.exclude),
    )
    fallback = None
    if args.auto_fallback:
        fallback = {"goal_sqnr_db": args.fallback_goal_db, "max_float_nodes": args.max_float_nodes}
    from zenith_onnx.runtime import using_threads

    with using_threads(args.threads):
        quantize_file(args.model, args.output, data=args.data, ranges=args.ranges, config=config,
                      report_path=args.report, fallback=fallback)
    return EXIT_OK


def _cmd_demo(args) -> int:
    if args.name == "digits":
        from zenith_onnx.demo.digits import run_demo
    else:
        from zenith_onnx.demo.sine import run_demo
    run_demo(out_dir=args.out, quick=args.quick)
    return EXIT_OK


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # onnx_ir logs its own pass-manager chatter at INFO; keep ours readable.
    logging.getLogger("onnx_ir").setLevel(max(level, logging.WARNING))


def _one_line(text: str) -> str:
    """Names in a model (or a path) may hold newlines or terminal escapes: print them escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    traceback_wanted = "--traceback" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        _setup_logging(args.verbose)
        if not getattr(args, "handler", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return args.handler(args)
    except ZenithError as e:
        print(f"zenith-onnx: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("zenith-onnx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("zenith-onnx: error: out of memory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a bug: one line unless --traceback
        if traceback_wanted:
            raise
        first = _one_line((str(e).splitlines() or [""])[0][:300])
        print(
            f"zenith-onnx: internal error: {type(e).__name__}: {first} (rerun with --traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
