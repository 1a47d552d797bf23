"""``python -m blixard.sim``: replay one seed, or run many and summarise.

    python -m blixard.sim --seed 42 --trace          # one seed, every event printed
    python -m blixard.sim --seeds 0..99 --nodes 20   # many seeds: events/s, failovers
    python -m blixard.sim --seeds 0..999 --nodes 50 --duration 600   # a long run

Exits 1 if any seed broke an invariant (each failure names its seed, so it
replays exactly with ``--seed N --trace``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from blixard.sim.config import Load, Model, SimConfig, Timing
from blixard.sim.run import RunResult, run_one, run_seeds


def parse_seeds(text: str) -> range:
    """``7`` or ``0..99`` (inclusive)."""
    if ".." in text:
        low, _, high = text.partition("..")
        return range(int(low), int(high) + 1)
    return range(int(text), int(text) + 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blixard.sim", description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="run (replay) one seed")
    which.add_argument("--seeds", type=parse_seeds, help="a range of seeds, e.g. 0..99")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--duration", type=float, default=180.0, help="virtual seconds per run")
    p.add_argument("--quiet", type=float, default=30.0, help="fault-free seconds at the end")
    p.add_argument("--trace", action="store_true", help="print every trace line")
    p.add_argument("--paranoid", action="store_true", help="check everything after every event")
    p.add_argument("--grace", type=float, help="controller failover grace (default 1.5 s)")
    p.add_argument("--margin", type=float, help="agents' fencing margin (default 1 s)")
    p.add_argument("--drift", type=float, help="agents' clock rate spread (default 0.001)")
    p.add_argument(
        "--slow-latency",
        metavar="LOW,HIGH",
        help="round trip of a store request on a slow-disk node (default 0.1,2.0 seconds)",
    )
    p.add_argument("--fault-interval", type=float, help="mean seconds between faults (default 5)")
    p.add_argument(
        "--faults",
        help="only these fault kinds, comma-separated (default: all; see blixard.sim.faults)",
    )
    p.add_argument(
        "--fixed",
        action="store_true",
        help="model every proposed fix (config.Model.fixed()) instead of the code as it is",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="RULE=BOOL",
        help="change a modelled rule (see blixard.sim.config.Model), e.g. revoke_on_stop=false",
    )
    return p


def config_from(args: argparse.Namespace) -> SimConfig:
    timing = Timing()
    changes: dict[str, float] = {}
    if args.grace is not None:
        changes["failover_grace_s"] = args.grace
    if args.margin is not None:
        changes["fence_margin_s"] = args.margin
    if args.drift is not None:
        changes["clock_drift"] = args.drift
    timing = replace(timing, **changes)  # type: ignore[arg-type]
    if args.slow_latency:
        low, _, high = args.slow_latency.partition(",")
        timing = replace(timing, slow_store_latency_s=(float(low), float(high)))
    model = Model.fixed() if args.fixed else Model()
    for item in args.model:
        key, _, value = item.partition("=")
        if key not in Model.__dataclass_fields__:
            raise SystemExit(f"--model: unknown rule {key!r}")
        model = replace(model, **{key: value.lower() in {"1", "true", "yes", "on"}})
    load = Load()
    if args.faults:
        wanted = args.faults.split(",")
        known = dict(load.fault_weights)
        unknown = [k for k in wanted if k not in known]
        if unknown:
            raise SystemExit(
                f"--faults: unknown kind(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        load = replace(load, fault_weights=tuple((k, known[k]) for k in wanted))
    if args.fault_interval is not None:
        load = replace(load, fault_interval_s=args.fault_interval)
    return SimConfig(
        load=load,
        nodes=args.nodes,
        duration_s=args.duration,
        quiet_s=args.quiet,
        timing=timing,
        model=model,
        paranoid=args.paranoid,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = config_from(args)
    if args.seeds is None:
        seed = 0 if args.seed is None else args.seed
        echo = print if args.trace else None
        result = run_one(replace(base, seed=seed), echo=echo)
        print(
            f"seed {seed}: {result.events} events, {result.virtual_s:.0f} virtual s in "
            f"{result.wall_s:.2f}s ({result.events / max(result.wall_s, 1e-9):,.0f} events/s), "
            f"trace {result.trace_hash[:16]}"
        )
        if result.violation is not None:
            print(result.violation, file=sys.stderr)
            return 1
        print("all invariants held")
        return 0

    def progress(result: RunResult) -> None:
        mark = (
            "ok"
            if result.ok
            else f"FAILED ({result.violation.invariant if result.violation else ''})"
        )
        print(
            f"seed {result.seed}: {mark}, {result.events} events, {result.wall_s:.2f}s",
            file=sys.stderr,
            flush=True,
        )

    summary = run_seeds(args.seeds, base, progress)
    print(summary.report())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
