"""Files that survive a kill: atomic writes, and append-only JSONL keyed by a content hash."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")  # separator, so ("ab", "c") and ("a", "bc") differ
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class JsonlStore:
    """Append-only JSONL of records with a unique `key_field`.

    Each record is one flushed line, so a kill loses at most the line being written; a torn last
    line is dropped on the next open and later records with an existing key are ignored, so a rerun
    neither loses nor duplicates anything.
    """

    def __init__(self, path: str | Path, key_field: str = "key"):
        self.path, self.key_field = Path(path), key_field
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.torn_lines += 1
                    continue
                self.records.setdefault(record[key_field], record)
            if self.torn_lines:
                # rewrite without the torn line so appends start on a clean line
                atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str):
        return self.records.get(key)

    def append(self, records: list[dict]) -> None:
        new = [r for r in records if r[self.key_field] not in self.records]
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
        for r in new:
            self.records[r[self.key_field]] = r
