"""Failed requests during a deploy under load: `ftctl deploy` vs the seed's way.

Two threads POST /predict in a loop (bounded in count and time, loopback only) while the ~400 MB
model is deployed: the seed's `scp -r` over the live directory + restart, ftctl with the
restart command, and ftctl with a reload (SIGHUP: `ftctl serve` loads beside and swaps).

    .venv/bin/python bench/bench_deploy_downtime.py [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import sys

from deploykit import FTCTL_RELOAD, SEED, cache_arg, emit, rig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    args = ap.parse_args()
    with rig(args.cache) as r:
        runs = r.compare(load_threads=2)
    seed = runs[SEED]["requests_failed"]
    lines = ["\nfailed requests during the deploy (2 request loops)"]
    for name, x in runs.items():
        total = x["requests_ok"] + x["requests_failed"]
        lines.append(
            f"  {name:24s}: {x['requests_failed']:5d} failed of {total:5d}, failing for "
            f"{x['failing_window_s']:.1f} s {x['errors'] or ''}"
        )
    best = runs[FTCTL_RELOAD]["requests_failed"]
    lines.append(f"  seed / ftctl (reload): {seed} / {best} failed requests")
    emit({"runs": runs}, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
