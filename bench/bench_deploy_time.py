"""Deploy wall time: `ftctl deploy` vs the seed's `scp -r` + `ssh ... restart`.

Same ~400 MB model, same real server (sshd + supervisor + `ftctl serve` on loopback), no load.
The clock runs from the start of the deploy until /health reports the new model's sha256.

    .venv/bin/python bench/bench_deploy_time.py [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import sys

from deploykit import SEED, cache_arg, emit, ratio, rig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    args = ap.parse_args()
    with rig(args.cache) as r:
        runs = r.compare(load_threads=0)
    seed = runs[SEED]["until_serving_s"]
    lines = [f"\nmodel: {r.model_bytes / 1e6:.0f} MB; wall time until the service answers with it"]
    for name, x in runs.items():
        t = x["until_serving_s"]
        lines.append(f"  {name:24s}: {t:6.1f} s   ({ratio(t, seed)} the seed's time)")
    emit({"model_bytes": r.model_bytes, "runs": runs}, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
