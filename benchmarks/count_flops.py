"""FLOPs of a workload at full size, counted on the meta device (no GPU, no weights, seconds).

python -m benchmarks.count_flops                  # W768 with 1 and 4 samples
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flashface_trt.models.config import CUTS, SD15

from .workload import PATTERN_FLOPS_NOTE, Workload, meta_loop_flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--refs", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--samples", type=int, nargs="+", default=[1, 4])
    p.add_argument("--json", type=Path, help="write the counts here")
    args = p.parse_args(argv)
    record = {}
    for n in args.samples:
        w = Workload(args.height, args.width, args.refs, args.steps, n)
        counts = meta_loop_flops(SD15, w)
        ours, base, uncut = counts["ours"], counts["official_pattern"], counts["ours_uncut"]
        saved = {c: (uncut["loop"] - counts[f"ours_cut_{c}_only"]["loop"]) / 1e12 for c in CUTS}
        record[f"samples={n}"] = {
            "ours_tflop": {k: v / 1e12 for k, v in ours.items()},
            "ours_uncut_tflop": {k: v / 1e12 for k, v in uncut.items()},
            "loop_tflop_saved_by_each_cut_alone": saved,
            "ours_without_lse_loop_tflop": counts["ours_without_lse"]["loop"] / 1e12,
            "official_pattern_loop_tflop": base["loop"] / 1e12,
        }
        parts = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in ours.items() if k != "loop")
        print(
            f"{w}: loop {ours['loop'] / 1e12:.1f} TFLOP (official pattern {base['loop'] / 1e12:.1f}, "
            f"more by construction); {parts}"
        )
        print(
            f"  without the UNet cuts {uncut['loop'] / 1e12:.1f} TFLOP; each cut alone saves "
            + ", ".join(f"{c} {v:.2f}" for c, v in saved.items())
            + f"; all but lse (the default export) {counts['ours_without_lse']['loop'] / 1e12:.1f} TFLOP"
        )
    record["note"] = PATTERN_FLOPS_NOTE
    print(f"official pattern: {PATTERN_FLOPS_NOTE}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
