"""Decision time of TetriServe with model placement (loads and evictions in the plan) at 16 and 64 active
requests on random multi-model views, timed alternately with plain TetriServe on the same views.

    python scripts/placement_decision_time.py [--samples 200]
"""
from __future__ import annotations

import argparse
import json

from comfy_tetriserve.sim.multimodel_bench import decision_timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="random views per size (default: 200)")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps({n: decision_timing("h200", n, args.samples, args.gpus, 50) for n in (16, 64)}, indent=1))


if __name__ == "__main__":
    main()
