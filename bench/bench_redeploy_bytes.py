"""Bytes sent to redeploy an unchanged model: `ftctl deploy` vs the seed's `scp -r`.

The server already holds the ~400 MB model. Counted on the loopback interface (/proc/net/dev),
so SSH framing, encryption and the control traffic are all included.

    .venv/bin/python bench/bench_redeploy_bytes.py [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import sys

from deploykit import cache_arg, emit, lo_bytes, ratio, rig, seed_deploy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache_arg(ap)
    args = ap.parse_args()
    with rig(args.cache) as r:
        print("first deploy (not counted) ...", flush=True)
        r.ftctl_deploy()()
        print("ftctl redeploy ...", flush=True)
        b0 = lo_bytes()
        uploaded = r.ftctl_deploy()()["uploaded_bytes"]
        ftctl = lo_bytes() - b0
        print("seed scp -r ...", flush=True)
        copy_dir = r.remote_dir.parent / "seed-copy"  # scp -r again, into a plain directory
        copy_dir.mkdir()
        shutil.copytree(r.new, copy_dir / "final")
        b0 = lo_bytes()
        seed_deploy(r.sshd, r.new, copy_dir, "true")  # the copy only; a restart sends ~nothing
        seed = lo_bytes() - b0
    lines = [
        "\nbytes over loopback to redeploy the unchanged model",
        f"  seed scp -r : {seed:13,d}",
        f"  ftctl       : {ftctl:13,d}  (file data uploaded: {uploaded})",
        f"  seed / ftctl: {ratio(seed, ftctl)}",
    ]
    emit({"seed_bytes": seed, "ftctl_bytes": ftctl, "ftctl_uploaded": uploaded}, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
