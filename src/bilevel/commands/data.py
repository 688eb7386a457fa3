"""``bilevel data list | fetch | verify``: the data cache from the command line.

Each handler parses nothing itself: it calls :mod:`bilevel.data` and prints one line per data
set. Errors carry ``exit_code = 3`` and are reported by ``bilevel.cli``.
"""

from __future__ import annotations

import argparse
import sys

from bilevel.data import (
    REGISTRY,
    DataError,
    default_data_dir,
    fetch_dataset,
    list_datasets,
    verify_dataset,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its three subcommands to the ``bilevel`` parser."""
    data = subparsers.add_parser("data", help="list, fetch and verify data sets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", default=None,
        help=f"data directory (default: $BILEVEL_DATA, else {default_data_dir()})",
    )

    p = sub.add_parser("list", parents=[common], help="what exists, what is cached, size, source")
    p.set_defaults(handler=_list)

    p = sub.add_parser("fetch", parents=[common], help="download, verify and cache data sets")
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(REGISTRY), help="data sets (see `bilevel data list`)")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="read the raw files from DIR instead of the network (UCI: the shared/data/uci layout)")
    p.set_defaults(handler=_fetch)

    p = sub.add_parser(
        "verify", parents=[common],
        help="re-hash cached arrays against their manifests and pinned sha256s",
        description="Exit 0 only when every named data set is cached and matches its pinned "
                    "hashes; 3 when one is missing (the fetch command is printed) or corrupted "
                    "(the file is named); 2 for an unknown name.")
    p.add_argument("names", nargs="*", metavar="NAME", help="data sets (default: every cached one)")
    p.set_defaults(handler=_verify)


def _list(args: argparse.Namespace) -> int:
    rows = list_datasets(args.data_dir)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "cached" if r["cached"] else ("on demand" if r["generated"] else "missing")
        size = _human(r["bytes"]) if r["cached"] else ""
        print(f"{r['name']:<{width}}  {state:<9}  {size:>9}  {r['summary']}  [{r['source']}]")
    return 0


def _human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with one decimal."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def _fetch(args: argparse.Namespace) -> int:
    for name in args.names:
        m = fetch_dataset(name, args.data_dir, from_dir=args.from_dir)
        shapes = ", ".join(f"{k} {tuple(v['shape'])}" for k, v in m["arrays"].items())
        raw = ", ".join(f"{k} sha256 {v[:12]}…" for k, v in m["raw_sha256"].items()) or "generated"
        print(f"{name}: verified ({raw}); cached {shapes} in {m['path']} [{m['seconds']:.1f} s]")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """One line per data set; exit 3 if any is missing or corrupted (every name is checked)."""
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        print(f"error: unknown data set(s) {', '.join(unknown)}; known: "
              f"{', '.join(sorted(REGISTRY))}", file=sys.stderr)
        return 2
    names = args.names or [r["name"] for r in list_datasets(args.data_dir) if r["cached"]]
    if not names:
        print("nothing cached to verify")
    code = 0
    for name in names:
        try:
            r = verify_dataset(name, args.data_dir)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)  # the message names the set
            code = max(code, exc.exit_code)
            continue
        detail = "computed on demand, no fetch needed" if r["status"] == "generated" else f"{r['arrays']} arrays"
        print(f"{name}: {r['status']} ({detail})")
    return code
