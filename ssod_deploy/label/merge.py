"""`ssod merge`: combine the outputs of `ssod label --shard i/n` runs into what one run writes.

Each shard folder keeps its journal. Merging checks the shards belong to one job (same file
list, model, thresholds and batch; every shard present once and complete), copies their
records in image-index order into OUT's journal and builds the outputs from it with the same
code as a single run -- so the merged files are byte-identical to an unsharded run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssod_deploy.label import journal as jn
from ssod_deploy.label.writers import (
    FORMATS,
    LS_URL_PREFIX,
    SUMMARY_NAME,
    build_outputs,
    parse_formats,
    write_json_atomic,
)


def merge_outputs(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    formats: str | Sequence[str] = FORMATS,
    save_conf: bool = False,
    ls_url_prefix: str = LS_URL_PREFIX,
) -> dict[str, Any]:
    """Merge shard folders into ``out``; returns the merged summary.json's dict."""
    fmts = parse_formats(formats)
    out = Path(out)
    dirs = [Path(p) for p in inputs]
    if not dirs:
        raise ValueError("ssod merge: give the shard output folders to merge")
    if any(os.path.realpath(d) == os.path.realpath(out) for d in dirs):
        raise ValueError(f"{out}: --out must be a new folder, not one of the shard folders")
    indexes = [jn.read_journal(d / jn.JOURNAL_NAME) for d in dirs]

    ref = indexes[0].header
    for d, ix in zip(dirs[1:], indexes[1:]):
        diff = jn.header_mismatch(ref, ix.header)
        if diff:
            raise ValueError(f"{d}: not a shard of the same job as {dirs[0]}: "
                             f"{jn.describe_mismatch(ref, ix.header, diff)} differ")
    n_shards = {tuple(ix.header["shard"])[1] for ix in indexes}
    if len(n_shards) != 1:
        raise ValueError(f"shard folders disagree on the number of shards: {sorted(n_shards)}")
    n = n_shards.pop()
    owner: dict[int, int] = {}
    for k, ix in enumerate(indexes):
        i = int(ix.header["shard"][0])
        if i in owner:
            raise ValueError(f"shard {i}/{n} given twice: {dirs[owner[i]]} and {dirs[k]}")
        owner[i] = k
    missing = sorted(set(range(n)) - set(owner))
    if missing:
        raise ValueError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}: the merge would not cover every image")

    n_total, batch = int(ref["n_total"]), int(ref["batch"])
    for i, k in owner.items():
        need = jn.shard_mask(n_total, batch, i, n)
        have = int((need & indexes[k].done).sum())
        if have < int(need.sum()):
            raise ValueError(
                f"{dirs[k]}: shard {i}/{n} is incomplete ({have} of {int(need.sum())} images); "
                "finish it with `ssod label ... --resume` first"
            )

    out.mkdir(parents=True, exist_ok=True)
    jpath = out / jn.JOURNAL_NAME
    if jpath.exists():
        old = jn.read_journal(jpath).header
        if "merged_from" not in old:
            raise ValueError(f"{out} holds a labeling run of its own; merge into a new folder")
    header = {**ref, "shard": [0, 1], "merged_from": [str(d) for d in dirs]}
    _write_merged_journal(jpath, header, [indexes[owner[i]] for i in range(n)], n_total, batch, n)

    index = jn.read_journal(jpath)
    stats = build_outputs(index, out, fmts, save_conf=save_conf, ls_url_prefix=ls_url_prefix)
    from ssod_deploy.label.pipeline import make_summary

    shard_summaries = [_read_summary(d) for d in dirs]
    first = shard_summaries[0] or {}
    summary = make_summary(
        header=header, stats=stats, formats=fmts, source=str(ref.get("source", "")), out=str(out),
        model={k: v for k, v in first.get("model", {}).items() if k != "model_version"},
        thresholds_source=first.get("thresholds", {}).get("source", "merged shards"),
        throughput={"shards": [
            {"folder": str(d), "shard": (s or {}).get("shard"), **((s or {}).get("throughput") or {})}
            for d, s in zip(dirs, shard_summaries)
        ]},
        images_in_shard=n_total,
    )
    summary["merged_from"] = [str(d) for d in dirs]
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def _write_merged_journal(path: Path, header: dict, by_shard: list[jn.JournalIndex], n_total: int,
                          batch: int, n: int) -> None:
    """Records of every shard, in image-index order, into one journal (atomic replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.merge.tmp")
    handles = [open(ix.path, "rb") for ix in by_shard]  # noqa: SIM115
    try:
        with open(tmp, "wb") as f:
            f.write((json.dumps(header, separators=(",", ":")) + "\n").encode("utf-8"))
            for start in range(0, n_total, batch):
                s = (start // batch) % n
                ix, fh = by_shard[s], handles[s]
                for i in range(start, min(start + batch, n_total)):
                    f.write(ix.read_line(fh, i))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        for h in handles:
            h.close()
        if tmp.exists():
            tmp.unlink()


def _read_summary(d: Path) -> dict | None:
    try:
        return json.loads((d / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
