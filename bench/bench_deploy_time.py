"""Deploy wall time: `ftctl deploy` vs the seed's `scp -r` + `ssh ... restart`.

Same ~400 MB model, same real server (sshd + supervisor + `ftctl serve` on loopback), no load.
The clock runs from the start of the deploy until /health reports the new model's sha256.

    .venv/bin/python bench/bench_deploy_time.py [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from deploykit import cache_arg, emit, model_digest, ratio, rig, timed


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
            runs[name] = timed(fn, r.port, digest, load_threads=0)
    seed = runs["seed scp -r + restart"]["until_serving_s"]
    lines = [f"\nmodel: {r.model_bytes / 1e6:.0f} MB; wall time until the service answers with it"]
    for name, x in runs.items():
        t = x["until_serving_s"]
        lines.append(f"  {name:24s}: {t:6.1f} s   ({ratio(t, seed)} the seed's time)")
    emit({"model_bytes": r.model_bytes, "runs": runs}, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
