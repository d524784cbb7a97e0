"""Plot attention peak memory and time against sequence length, per mode, from a run's JSON.

    python benchmarks/plot.py [benchmarks/results/cpu-quick.json] [-o benchmarks/attention.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
STYLE = {"naive": ("tab:red", "o"), "chunked": ("tab:blue", "s"), "sdpa": ("tab:green", "^")}
DASH = {"torch": "-", "mlx": "--"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", default=str(HERE / "results" / "cpu-quick.json"))
    p.add_argument("-o", "--output", default=str(HERE / "attention.png"))
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(args.json).read_text())
    rows = [r for r in doc["results"] if r["bench"] == "attention" and r.get("seconds") is not None]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (backend, dtype, mode) in sorted({(r["backend"], r["dtype"], r["mode"]) for r in rows}):
        pts = sorted((r["seq"], r["peak_bytes"], r["seconds"]) for r in rows
                     if (r["backend"], r["dtype"], r["mode"]) == (backend, dtype, mode))
        color, marker = STYLE.get(mode, ("black", "x"))
        kw = dict(color=color, marker=marker, linestyle=DASH.get(backend, ":"), label=f"{backend} {dtype} {mode}")
        ax_mem.plot([s for s, _, _ in pts], [max(b, 1) / 2**30 for _, b, _ in pts], **kw)
        ax_time.plot([s for s, _, _ in pts], [t for _, _, t in pts], **kw)
    skipped: dict = {}
    for r in doc["results"]:
        if r["bench"] == "attention" and r.get("skipped") and r["skipped"].startswith("needs"):
            skipped.setdefault((r["backend"], r["dtype"], r["seq"], r["skipped"].split(",")[0]), []).append(r["mode"])
    for i, ((backend, _dtype, seq, need), modes) in enumerate(sorted(skipped.items())):
        ax_mem.annotate(f"{backend} {'/'.join(modes)} at {seq}: not run ({need})", xy=(0.02, 0.95 - 0.06 * i),
                        xycoords="axes fraction", fontsize=7, va="top")
    for ax, label in ((ax_mem, "peak memory of the call (GiB)"), (ax_time, "seconds per call")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens; batch 2, 5 heads, head dim 64)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    m = doc.get("machine", {})
    fig.suptitle(f"attention modes on {m.get('cuda_device') or m.get('cpu', '?')} "
                 f"(torch {m.get('torch')}, mlx {m.get('mlx')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
