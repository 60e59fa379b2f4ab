"""The demo over three hosts on this machine (root only): three network namespaces, each
with its own address and a `deathstar daemon` (two workers), and `deathstar map` over them
from the root namespace, with the report and the timeline plot.

    sudo .venv/bin/python scripts/multihost_demo.py [--seeds 2000] [--draws 100000]
        [--plot docs/timeline.png]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_daemon  # noqa: E402
from tests.netns.hosts import netns_available, virtual_hosts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--plot", default="out/multihost.png")
    parser.add_argument("--report", default="out/multihost.json")
    args = parser.parse_args()
    reason = netns_available()
    if reason:
        print(f"cannot make hosts here: {reason}", file=sys.stderr)
        return 2
    seeds = ROOT / "out" / "multihost-seeds.jsonl"
    seeds.parent.mkdir(exist_ok=True)
    seeds.write_text("".join(f"{i}\n" for i in range(args.seeds)))
    os.environ["DEATHSTAR_KEYS"] = "none"
    with virtual_hosts(3) as hosts:
        daemons = [start_daemon(args.workers, "--insecure", host=h.address, port=6000,
                                wrap=h.argv([]), stderr=subprocess.DEVNULL) for h in hosts]
        try:
            cmd = [sys.executable, "-m", "deathstar", "map", "examples.pi:estimate_pi",
                   "--args", str(seeds), "--kwargs", f'{{"draws": {args.draws}}}',
                   "--cluster", ",".join(d.address for d in daemons), "--out",
                   str(ROOT / "out" / "multihost.jsonl"), "--report", args.report,
                   "--plot", args.plot]
            return subprocess.run(cmd, cwd=ROOT).returncode
        finally:
            for d in daemons:
                d.stop()


if __name__ == "__main__":
    sys.exit(main())
