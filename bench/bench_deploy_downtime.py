"""Failed requests during a deploy under load: `ftctl deploy` vs the seed's way.

Two threads POST /predict in a loop (bounded in count and time, loopback only) while the ~400 MB
model is deployed: the seed's `scp -r` over the live directory + restart, ftctl with the
restart command, and ftctl with a reload (SIGHUP: `ftctl serve` loads beside and swaps).

    .venv/bin/python bench/bench_deploy_downtime.py [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from deploykit import cache_arg, emit, model_digest, rig, timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    args = ap.parse_args()
    with rig(args.cache) as r:
        digest = model_digest(r.new)
        runs = {}
        for name, fn in (
            ("seed scp -r + restart", r.seed_deploy()),
            ("ftctl deploy (restart)", r.ftctl_deploy()),
            (
                "ftctl deploy (reload)",
                r.ftctl_deploy(dataclasses.replace(r.cfg, reload_cmd=r.sup.reload_cmd)),
            ),
        ):
            print(f"{name} ...", flush=True)
            r.reset()
            runs[name] = timed(fn, r.port, digest, load_threads=2)
    seed = runs["seed scp -r + restart"]["requests_failed"]
    lines = ["\nfailed requests during the deploy (2 request loops)"]
    for name, x in runs.items():
        total = x["requests_ok"] + x["requests_failed"]
        lines.append(
            f"  {name:24s}: {x['requests_failed']:5d} failed of {total:5d}, failing for "
            f"{x['failing_window_s']:.1f} s {x['errors'] or ''}"
        )
    best = runs["ftctl deploy (reload)"]["requests_failed"]
    lines.append(f"  seed / ftctl (reload): {seed} / {best} failed requests")
    emit({"runs": runs}, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
