"""Append-only journal of a labeling run: what makes kill -9 resumable and outputs reproducible.

``OUT/journal.jsonl`` holds one header line, then one JSON line per finished image::

    {"i": 17, "f": "sub/a.jpg", "h": 480, "w": 640, "b": [[x1, y1, x2, y2], ...],
     "s": [score, ...], "c": [class, ...], "u": [0 or 1 (uncertain), ...]}
    {"i": 18, "f": "sub/b.jpg", "skip": "truncated or corrupt image data (...)"}

``i`` is the image's position in the full sorted file list (the same in every shard). Lines
are written a batch at a time, flushed and fsync'd before the batch counts as done, so a
record on disk is never redone and a record not on disk is never assumed. A kill mid-write
leaves at most one partial last line; ``open_journal`` cuts it off before appending.

Final outputs are never built from memory during a run: ``JournalIndex`` keeps only two
numbers per image (byte offset and length of its line), so building them streams records
from disk in index order whatever order they were written in (resumed runs append late).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

JOURNAL_NAME = "journal.jsonl"
JOURNAL_KIND = "ssod-label-journal"
JOURNAL_VERSION = 1
BOX_DECIMALS = 2  # 0.01 px: finer than any annotation tool shows, keeps files small and stable
SCORE_DIGITS = 5  # significant digits: weak (1e-4) scores of young models keep their precision

# Header keys that must agree for two journals (a resumed run, or the shards of one job) to be
# parts of the same run. Everything else in the header is informational.
RUN_KEYS = ("n_total", "list_sha256", "batch", "names", "settings", "model_fingerprint")


class JournalError(ValueError):
    """A journal that cannot be used (corrupt, or from a different run); message names the file."""


def list_fingerprint(names: Sequence[str]) -> str:
    """sha256 of the sorted-run file list: resumes and shards must see the same list."""
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def shard_mask(n_total: int, batch: int, shard_i: int, shard_n: int) -> np.ndarray:
    """Which images shard i/n owns: fixed chunks of ``batch`` images, dealt round-robin."""
    return (np.arange(n_total) // batch) % shard_n == shard_i


def round_significant(x: np.ndarray, digits: int = SCORE_DIGITS) -> np.ndarray:
    """Round to ``digits`` significant digits, vectorised.

    ``round(x * 10^d) / 10^d`` is the double nearest the decimal (10^d is exact and IEEE
    division is correctly rounded), so the JSON text is short and the same on every run.
    """
    x = np.asarray(x, np.float64)
    mag = np.floor(np.log10(np.abs(x), out=np.zeros_like(x), where=x != 0))
    scale = 10.0 ** np.clip(digits - 1 - mag, 0, 22)
    return np.round(x * scale) / scale


def encode_record(
    index: int,
    name: str,
    hw: tuple[int, int],
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    uncertain: np.ndarray,
) -> str:
    """One journal line for a labeled image (rounded so the text is stable run to run)."""
    rec = {
        "i": int(index),
        "f": name,
        "h": int(hw[0]),
        "w": int(hw[1]),
        "b": np.round(np.asarray(boxes, np.float64).reshape(-1, 4), BOX_DECIMALS).tolist(),
        "s": round_significant(np.asarray(scores, np.float64).reshape(-1)).tolist(),
        "c": np.asarray(labels, np.int64).reshape(-1).tolist(),
        "u": np.asarray(uncertain, np.int8).reshape(-1).tolist(),
    }
    return json.dumps(rec, separators=(",", ":")) + "\n"


def encode_skip(index: int, name: str, reason: str) -> str:
    """One journal line for an image that was reported and skipped."""
    return json.dumps({"i": int(index), "f": name, "skip": " ".join(str(reason).split())},
                      separators=(",", ":")) + "\n"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class JournalWriter:
    """Appends batches of lines durably (write, flush, fsync) to an open journal."""

    def __init__(self, path: Path, fh):
        self.path = path
        self._fh = fh

    def append(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        self._fh.write("".join(lines).encode("utf-8", "surrogateescape"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class JournalIndex:
    """Where each image's record sits in a journal file: ``offset[i] == -1`` means not done."""

    path: Path
    header: dict[str, Any]
    offset: np.ndarray  # (n_total,) int64
    length: np.ndarray  # (n_total,) int32
    valid_end: int  # byte offset just past the last complete line

    @property
    def done(self) -> np.ndarray:
        return self.offset >= 0

    def iter_records(self, indices: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
        """Parsed records in ascending image index (only done ones), streamed from disk."""
        idx = np.flatnonzero(self.done) if indices is None else np.asarray(indices)
        with open(self.path, "rb") as f:
            for i in idx:
                yield self._read(f, int(i))

    def read_line(self, f, i: int) -> bytes:
        f.seek(int(self.offset[i]))
        return f.read(int(self.length[i]))

    def _read(self, f, i: int) -> dict[str, Any]:
        return json.loads(self.read_line(f, i).decode("utf-8", "surrogateescape"))


def read_journal(path: str | os.PathLike) -> JournalIndex:
    """Index a journal; a partial last line (killed mid-write) is ignored, not an error."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise JournalError(f"{path}: no journal (not a `ssod label` output folder?)") from None
    with f:
        first = f.readline()
        header = _parse_header(path, first)
        n = int(header["n_total"])
        offset = np.full(n, -1, dtype=np.int64)
        length = np.zeros(n, dtype=np.int32)
        pos = len(first)
        valid_end = pos
        lineno = 1
        for line in f:
            lineno += 1
            if not line.endswith(b"\n"):
                break  # partial last line: the write that was interrupted
            try:
                rec = json.loads(line.decode("utf-8", "surrogateescape"))
                i = int(rec["i"])
            except (ValueError, KeyError, TypeError):
                rest = f.read(1)
                if not rest:  # a torn last line that happens to end in a newline byte
                    break
                raise JournalError(f"{path}: line {lineno} is not a valid record; the journal is corrupt") from None
            if not 0 <= i < n:
                raise JournalError(f"{path}: line {lineno} has image index {i} outside 0..{n - 1}")
            if offset[i] < 0:  # first record wins; a duplicate can only repeat the same result
                offset[i] = pos
                length[i] = len(line)
            pos += len(line)
            valid_end = pos
    return JournalIndex(path, header, offset, length, valid_end)


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("type") != JOURNAL_KIND or not line.endswith(b"\n"):
        raise JournalError(f"{path}: not an ssod label journal (bad or missing header line)")
    if header.get("version") != JOURNAL_VERSION:
        raise JournalError(f"{path}: journal version {header.get('version')} is not supported (expected {JOURNAL_VERSION})")
    return header


def make_header(**fields: Any) -> dict[str, Any]:
    return {"type": JOURNAL_KIND, "version": JOURNAL_VERSION, **fields}


def header_mismatch(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str] = RUN_KEYS) -> list[str]:
    """Names of run-defining keys whose values differ."""
    return [k for k in keys if a.get(k) != b.get(k)]


def describe_mismatch(old: dict[str, Any], new: dict[str, Any], keys: Sequence[str]) -> str:
    """What differs between two headers, in the user's terms (flags, not journal keys)."""
    parts = []
    if "n_total" in keys or "list_sha256" in keys:
        parts.append(f"the image list ({old.get('n_total')} images then, {new.get('n_total')} now)"
                     if old.get("n_total") != new.get("n_total") else "the image list (same count, other files)")
    if "batch" in keys:
        parts.append(f"--batch ({old.get('batch')} then, {new.get('batch')} now)")
    if "settings" in keys:
        o, n = old.get("settings") or {}, new.get("settings") or {}
        diff = sorted(k for k in set(o) | set(n) if o.get(k) != n.get(k))
        parts.append("settings (" + ", ".join(f"{k}: {o.get(k)} then, {n.get(k)} now" for k in diff) + ")")
    if "model_fingerprint" in keys or "names" in keys:
        parts.append("the model")
    if "shard" in keys:
        parts.append(f"--shard ({'/'.join(map(str, old.get('shard', [])))} then, {'/'.join(map(str, new.get('shard', [])))} now)")
    return "; ".join(parts)


def _lock(fh, path: Path) -> None:
    """One writer per journal: a second `ssod label` on the same OUT fails instead of interleaving."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise JournalError(f"{path}: another `ssod label` is writing this journal right now") from None


def create_journal(path: str | os.PathLike, header: dict[str, Any]) -> JournalWriter:
    """Start a new journal (atomically: a crash leaves either no journal or a valid header)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write((json.dumps(header, separators=(",", ":")) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    fh = open(path, "ab")  # noqa: SIM115
    _lock(fh, path)
    return JournalWriter(path, fh)


def open_for_append(index: JournalIndex) -> JournalWriter:
    """Reopen an existing journal for appending, cutting off a torn last line first."""
    fh = open(index.path, "r+b")  # noqa: SIM115
    _lock(fh, index.path)
    fh.truncate(index.valid_end)
    fh.seek(index.valid_end)
    os.fsync(fh.fileno())
    return JournalWriter(index.path, fh)
