"""Per-field figures for the closing notes: optembed's rows/dims and DNIS's kept entries
against the synthetic teacher's planted signal (C1 strong, C2 weak, C3 faint, C4 none, ...)."""

import glob
import json
import sys

import numpy as np

sys.path.insert(0, "/work/main")
PATTERN = (1.0, 0.5, 0.2, 0.0)
NAMES = {1.0: "strong", 0.5: "weak", 0.2: "faint", 0.0: "none"}


def strength(name):
    return PATTERN[(int(name[1:]) - 1) % 4]


def optembed(d, budget):
    rows = []
    for f in sorted(glob.glob(f"{d}/cells/optembed-{budget}-*/result.json")):
        r = json.load(open(f))
        h = r["hyperparameters"]
        rows.append((r["seed"], h))
    if not rows:
        return
    print(f"\n### optembed @ {budget}: {len(rows)} seed(s)")
    card = {}
    meta = json.load(open("/work/sweepdata/synth200k/meta.json"))
    for s in meta["sparse"]:
        card[s["name"]] = s["cardinality"] if isinstance(s, dict) else None
    print("| signal | fields | rows | supernet kept | after fill | dim (mean) |")
    print("|---|---|---|---|---|---|")
    for level in PATTERN:
        names = [n for n in rows[0][1]["dims"] if strength(n) == level]
        tot = sum(card[n] for n in names)
        sk = np.mean(
            [sum(h.get("supernet_kept_rows", h["kept_rows"])[n] for n in names) for _, h in rows]
        )
        k = np.mean([sum(h["kept_rows"][n] for n in names) for _, h in rows])
        dims = np.mean([np.mean([h["dims"][n] for n in names]) for _, h in rows])
        print(
            f"| {NAMES[level]} | {len(names)} | {tot} | {sk:.0f} ({100 * sk / tot:.0f}%) "
            f"| {k:.0f} ({100 * k / tot:.0f}%) | {dims:.1f} |"
        )


def dnis(d, budget):
    from ctr.run import load_run_model

    cells = sorted(glob.glob(f"{d}/cells/dnis-{budget}-*/result.json"))
    if not cells:
        return
    print(
        f"\n### dnis @ {budget}: {len(cells)} seed(s); entries kept per row, "
        "by frequency block (head -> tail)"
    )
    per = {}
    for f in cells:
        r = json.load(open(f))
        best = max(range(len(r["grid"])), key=lambda i: r["grid"][i]["valid_auc"])
        model, _ = load_run_model(f.replace("result.json", f"p{best}"))
        kept = model.embedding.compressor.kept_dims()
        for name, blocks in kept.items():
            per.setdefault(strength(name), []).append([b["entries_per_row"] for b in blocks[1:]])
    print("| signal | head block | 2nd | ... | tail block | mean |")
    print("|---|---|---|---|---|---|")
    for level in PATTERN:
        lists = per.get(level, [])
        head = np.mean([b[0] for b in lists if b])
        second = np.mean([b[1] for b in lists if len(b) > 1])
        tail = np.mean([b[-1] for b in lists if b])
        mean = np.mean([np.mean(b) for b in lists if b])
        print(f"| {NAMES[level]} | {head:.2f} | {second:.2f} | | {tail:.2f} | {mean:.2f} |")


if __name__ == "__main__":
    for budget in ("2x", "10x"):
        optembed("/work/sweepdata/s3opt", budget)
    optembed("/work/sweepdata/main", "10x")
    dnis("/work/sweepdata/s3", "10x")
