"""The `gradaccum` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    result = run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, quiet=args.quiet)
    print(f"accumulated vs full-batch gradient, float64: max abs difference {result['max_abs_error_vs_full_batch_float64']:.2e}")
    print(f"trained {result['optimizer_steps']} steps of effective batch {result['effective_batch']} "
          f"(micro-batch {result['micro_batch']}): test accuracy {result['test_accuracy']:.3f}")
    print(f"wrote {Path(args.out) / 'demo.json'}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradaccum", description="Exact and adaptive gradient accumulation.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check exactness and train a small model with accumulation")
    demo.add_argument("--out", default="gradaccum-out/demo", help="output directory (default: %(default)s)")
    demo.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
