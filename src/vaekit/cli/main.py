"""Entry point of the ``vaekit`` command."""

from __future__ import annotations

import argparse
import sys

from vaekit import __version__
from vaekit.cli import (
    checkpoints,
    data,
    evaluate,
    fid_extractor,
    images,
    monitor,
    prior,
    registry,
    retrain,
    serve,
    train,
)
from vaekit.errors import VaekitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaekit", description="Variational Autoencoders, from training to production.")
    parser.add_argument("--version", action="version", version=f"vaekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    data.add_parser(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    images.add_parsers(sub)
    checkpoints.add_parser(sub)
    fid_extractor.add_parser(sub)
    prior.add_parser(sub)
    registry.add_parser(sub)
    serve.add_parser(sub)
    monitor.add_parser(sub)
    retrain.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VaekitError as exc:
        print(f"vaekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the OS refused, not caught closer to where it happened: one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"vaekit {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
