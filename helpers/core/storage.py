"""Files that survive a kill: atomic writes, append-only JSONL keyed by a content hash, and the one resumable batch
loop, also spread over the processes of `torchrun` / `accelerate launch` (one shard file each, merged at the end)."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .settings import processes

# cuBLAS and cuDNN report a failed workspace allocation as a plain RuntimeError, not as torch.OutOfMemoryError
ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


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
    def __init__(self, path: str | Path | None, key_field: str = "key"):
        """`path` None: records are kept in memory only."""
        self.path, self.key_field = (Path(path) if path is not None else None), key_field
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.torn_lines += 1
                    continue
                self.records.setdefault(record[key_field], record)
            if self.torn_lines:  # rewrite without the torn line so appends start on a clean line
                self.write(list(self.records.values()))

    def write(self, records: list[dict]) -> None:
        """Replace the file's content with `records` (atomically) and keep them."""
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.records = {r[self.key_field]: r for r in records}

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
        if self.path is None:
            self.records.update((r[self.key_field], r) for r in new)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
        for r in new:
            self.records[r[self.key_field]] = r


def run_batches(store: JsonlStore, items: list, key, work, *, batch_size: int, desc: str, unit: str = "item",
                progress: bool = True) -> dict:
    """Run `work(batch) -> records` on the items whose `key(item)` is not in `store` yet, appending each batch's
    records as soon as it is done, so a kill loses at most the batch in flight and a rerun skips what is done.

    On CUDA out-of-memory (`is_out_of_memory`) the batch size halves and the same batch is tried again (down to 1):
    long GPU steps find the batch size that fits instead of dying. Returns counts and the batch size that ran last.
    """
    todo = [item for item in items if key(item) not in store]
    start, position = time.time(), 0
    with tqdm(total=len(items), initial=len(items) - len(todo), unit=unit, desc=desc, disable=not progress) as bar:
        while position < len(todo):
            batch = todo[position:position + batch_size]
            try:
                records = work(batch)
            except Exception as error:
                if batch_size == 1 or not is_out_of_memory(error):
                    raise
                records = None
            if records is None:  # retried here, after the except block released the failed batch's tensors
                batch_size //= 2
                free_gpu_memory()
                bar.write(f"{desc}: out of GPU memory, batch size now {batch_size}")
                continue
            store.append(records)
            position += len(batch)
            bar.update(len(batch))
    return {"items": len(items), "done_now": len(todo), "done_before": len(items) - len(todo),
            "seconds": round(time.time() - start, 2), "batch_size": batch_size}


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out of memory, including cuBLAS / cuDNN failing to allocate their workspace."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(name in str(error) for name in ALLOCATION_FAILURES))


def shard_path(path: Path, process_index: int | str) -> Path:
    """Where process `process_index` appends its records of `path` during a multi-process step ("*": any process)."""
    return path.with_name(f"{path.stem}.process-{process_index}{path.suffix}")


def _merge_shards(store: JsonlStore, order: list[str] = ()) -> None:
    """Fold every process shard of `store` into it (new keys only, those in `order` in that order) and delete them.

    A kill after the write and before the deletion leaves shards whose keys are all in the store: merging them again
    adds nothing.
    """
    shards = sorted(store.path.parent.glob(shard_path(store.path, "*").name))
    if not shards:
        return
    new = {}
    for shard in shards:
        for key, record in JsonlStore(shard, store.key_field).records.items():
            if key not in store and key not in new:
                new[key] = record
    position = {key: i for i, key in enumerate(order)}
    store.write([*store.records.values(), *sorted(new.values(), key=lambda r: position.get(r[store.key_field],
                                                                                             len(position)))])
    for shard in shards:
        shard.unlink()


def open_store(path: str | Path, key_field: str = "key") -> JsonlStore:
    """The JsonlStore at `path`, with what a killed multi-process run left in its shards merged in first (by the
    main process; the others wait for it). Every process of the step calls this."""
    state = processes()
    if state.is_main_process:
        _merge_shards(JsonlStore(path, key_field))
    state.wait_for_everyone()
    return JsonlStore(path, key_field)


def run_sharded(store: JsonlStore, items: list, key, work, *, batch_size: int, desc: str, unit: str = "item",
                progress: bool = True) -> tuple[JsonlStore, dict]:
    """`run_batches` spread over the processes of this step; returns the store with every process's records and the
    counts of this process.

    One process: `run_batches` itself. Several: the pending items are cut into the batches one process would run and
    process i takes batches i, i + n, …, so each batch, hence each greedy output, is the one a single process
    computes. Each process appends to its own shard (resumable like the store); then the main process merges the
    shards into the store in `items` order, and every process reads the merged store back.
    """
    state = processes()
    if state.num_processes == 1 or store.path is None:
        return store, run_batches(store, items, key, work, batch_size=batch_size, desc=desc, unit=unit,
                                  progress=progress)
    todo = [item for item in items if key(item) not in store]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    mine = [item for batch in batches[state.process_index::state.num_processes] for item in batch]
    shard = JsonlStore(shard_path(store.path, state.process_index), store.key_field)
    counts = run_batches(shard, mine, key, work, batch_size=batch_size, unit=unit, progress=progress,
                         desc=f"{desc} [process {state.process_index + 1}/{state.num_processes}]")
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_shards(store, [key(item) for item in items])
    state.wait_for_everyone()
    return JsonlStore(store.path, store.key_field), counts


def free_gpu_memory() -> None:
    """Collect what no longer has a reference, then hand the cached blocks back to CUDA (a no-op on the CPU, where a
    full collection of the heap costs ~1 s and frees nothing the allocator keeps)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
