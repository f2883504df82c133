"""``vaekit data fetch NAME``: download, verify and cache a dataset."""

from __future__ import annotations

import argparse

from vaekit.data import LOADERS, load_dataset
from vaekit.data.sources import default_cache_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset management")
    verbs = p.add_subparsers(dest="data_verb", required=True)
    f = verbs.add_parser("fetch", help="fetch, verify and cache a dataset")
    f.add_argument("name", choices=sorted(LOADERS))
    f.add_argument("--data-dir", help="directory holding the dataset files (else $VAEKIT_DATA)")
    f.add_argument("--cache-dir", help="cache root (else $VAEKIT_CACHE or ~/.cache/vaekit)")
    f.add_argument("--sources", help="comma-separated sources to try, from local,cache,npm,http")
    f.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ds = load_dataset(args.name, data_dir=args.data_dir, cache_dir=args.cache_dir, sources=args.sources)
    print(f"{ds.name}: train {tuple(ds.train.images.shape)}, test {tuple(ds.test.images.shape)}, "
          f"{len(ds.classes)} classes")
    print(f"source: {ds.provenance}")
    print(f"cache: {args.cache_dir or default_cache_dir()}")
    return 0
