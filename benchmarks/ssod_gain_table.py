"""Tables of finished ``ssod_gain.py`` runs: one per output folder, then every row pooled over them.

    python benchmarks/ssod_gain_table.py runs/e20s0 runs/e20s1 runs/e20s0_seed1=runs/e20s0 [--baseline mean_teacher]

A single run of a row moves by a point or more with the training seed, the data draw or the host
(docs/benchmarks.md, issue 3), so a claim like "method A beats B" needs several tables. Each
folder is one table (one draw, seed and host: compare rows only inside it); the pooled table gives,
per row, the mean and range over the tables that have it of: mAP50-95 minus the supervised row,
minus the baseline row, and the fraction of the supervised-to-oracle gap it closes (tables
without an oracle row give no fraction, unless given as ``FOLDER=OTHER``: then OTHER's oracle row
is used, e.g. another training seed's oracle on the same data draw; the table says so). Per table it also prints val mAP50-95 at every
evaluation from the switch and the last epoch's pseudo-label statistics (``method/pl_*``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from statistics import mean

from ssod_gain import gap_closed  # same folder: run as python benchmarks/ssod_gain_table.py

METRIC = "mAP50-95"
PL_KEYS = ("pl_reliable_per_img", "pl_uncertain_per_img", "pl_reliable_precision", "pl_reliable_recall",
           "pl_precision", "pl_recall", "da_acc")


def load_table(folder: Path) -> dict[str, dict]:
    """``ssod_gain.json`` of one output folder (rows that finished)."""
    path = folder / "ssod_gain.json"
    if not path.exists():
        raise SystemExit(f"{path}: not found (is {folder} an ssod_gain.py --out folder?)")
    return json.loads(path.read_text())


def load_tables(specs: list[str]) -> dict[str, dict[str, dict]]:
    """``FOLDER`` or ``FOLDER=ORACLE_FOLDER`` -> table per name; the second form borrows the oracle row."""
    tables = {}
    for spec in specs:
        folder, _, oracle_from = spec.partition("=")
        table = load_table(Path(folder))
        if oracle_from and "oracle_100pct" not in table:
            oracle = load_table(Path(oracle_from)).get("oracle_100pct")
            if oracle is None:
                raise SystemExit(f"{oracle_from}/ssod_gain.json: no oracle_100pct row to lend to {folder}")
            table["oracle_100pct"] = {**oracle, "borrowed_from": oracle_from}
        tables[spec] = table
    return tables


def row_stats(table: dict[str, dict], row: str, baseline: str) -> dict[str, float]:
    """mAP50-95 of ``row`` against the table's supervised, baseline and oracle rows (NaN when absent)."""
    r, sup, base, orc = (table.get(k) for k in (row, "supervised", baseline, "oracle_100pct"))
    nan = float("nan")
    gap = gap_closed(r, sup, orc, METRIC)
    return {
        "map": r[METRIC],
        "map50": r["mAP50"],
        "vs_sup": (r[METRIC] - sup[METRIC]) * 100 if sup else nan,
        "vs_base": (r[METRIC] - base[METRIC]) * 100 if base else nan,
        "gap": nan if gap is None else gap,
    }


def curve_and_pl(run: Path, first_epoch: int) -> tuple[str, str]:
    """Val mAP50-95 from ``first_epoch`` on and the last epoch's pseudo-label statistics of one run."""
    csv_path = run / "results.csv"
    if not csv_path.exists():
        return "", ""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    curve = " ".join(f"{float(x['val/mAP50-95']):.3f}" for x in rows
                     if x.get("val/mAP50-95") and int(x["epoch"]) >= first_epoch)
    last = rows[-1] if rows else {}
    pl = " ".join(f"{k[3:] if k.startswith('pl_') else k}={float(last['method/' + k]):.2f}"
                  for k in PL_KEYS if last.get("method/" + k))
    return curve, pl


def _fmt(values: list[float], pct: bool = False) -> str:
    """Mean and range of the finite values ('' when none)."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return ""
    f = (lambda x: f"{x:.0%}") if pct else (lambda x: f"{x:+.1f}")
    return f(mean(v)) if len(v) == 1 else f"{f(mean(v))} ({f(min(v))} .. {f(max(v))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="ssod_gain.py --out folders, one table each; FOLDER=OTHER borrows "
                    "OTHER's oracle row when FOLDER has none")
    ap.add_argument("--baseline", default="mean_teacher", help="row every other row is compared with")
    ap.add_argument("--from-epoch", type=int, default=10, help="first epoch of the printed val curves")
    args = ap.parse_args()

    tables = load_tables(args.folders)
    for folder, table in tables.items():
        print(f"\n## {folder}\n")
        print(f"| row | {METRIC} | mAP50 | vs supervised | vs {args.baseline} | gap closed | val {METRIC} from epoch "
              f"{args.from_epoch} | pseudo labels, last epoch |")
        print("|---|---|---|---|---|---|---|---|")
        for row in table:
            s = row_stats(table, row, args.baseline)
            curve, pl = curve_and_pl(Path(table[row]["run"]), args.from_epoch)
            gap = "" if math.isnan(s["gap"]) else f"{s['gap']:.0%}"
            name = f"{row} (from {table[row]['borrowed_from']})" if "borrowed_from" in table[row] else row
            print(f"| {name} | {s['map']:.4f} | {s['map50']:.4f} | {_fmt([s['vs_sup']])} | {_fmt([s['vs_base']])} "
                  f"| {gap} | {curve} | {pl} |")

    rows = list(dict.fromkeys(r for t in tables.values() for r in t))
    print(f"\n## pooled over {len(tables)} tables (mean, range)\n")
    print(f"| row | tables | vs supervised | vs {args.baseline} | gap closed ({METRIC}) |")
    print("|---|---|---|---|---|")
    for row in rows:
        stats = [row_stats(t, row, args.baseline) for t in tables.values() if row in t]
        print(f"| {row} | {len(stats)} | {_fmt([s['vs_sup'] for s in stats])} | {_fmt([s['vs_base'] for s in stats])} "
              f"| {_fmt([s['gap'] for s in stats], pct=True)} |")


if __name__ == "__main__":
    main()
