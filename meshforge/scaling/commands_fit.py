"""``meshforge scaling fit|plot``: arguments and printing; the work is in :mod:`.fit` and :mod:`.plot`."""

from __future__ import annotations

import argparse
import json

from .commands import _floats, positive_numbers


def cmd_fit(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from .fit import fit_report, format_report

    budgets = positive_numbers("--budgets", args.budgets) if args.budgets is not None else None
    report = fit_report(
        args.results,
        approach=args.approach,
        budgets=budgets,
        bootstrap=args.bootstrap,
        seed=args.seed,
        envelope=args.envelope,
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_plot(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from .plot import plot_all

    for path in plot_all(args.results, args.output, bootstrap=args.bootstrap, envelope=args.envelope):
        print(f"wrote {path}")
    return 0


def _envelope_arg(p) -> None:
    p.add_argument(
        "--envelope",
        choices=("final", "curves"),
        default="final",
        help="approach 1: envelope of each run's final loss (default; right for cosine runs), or of the "
        "training curves (curves.csv; only for schedules whose intermediate points are valid)",
    )


def add_fit_parsers(s) -> None:
    p = s.add_parser("fit", help="fit scaling laws (Chinchilla approaches 1, 2, 3) to a results CSV or sweep dir")
    p.add_argument("results", help="a sweep dir, or any CSV with columns N, D, loss")
    p.add_argument("--approach", choices=("1", "2", "3", "all"), default="all")
    p.add_argument("--budgets", type=_floats, default=None, help="FLOP budgets to give compute-optimal N, D for")
    p.add_argument("--bootstrap", type=int, default=100, help="approach 3: bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    _envelope_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_fit)

    p = s.add_parser("plot", help="write the figures (PNG and SVG) of a results CSV or sweep dir")
    p.add_argument("results", help="a sweep dir, or any CSV with columns N, D, loss")
    p.add_argument("--output", default=None, help="figure dir (default: RESULTS' dir /figures)")
    p.add_argument("--bootstrap", type=int, default=0, help="approach 3 bootstrap resamples (0: point fit only)")
    _envelope_arg(p)
    p.set_defaults(func=cmd_plot)
