"""The synth output: an append-only JSONL file, one record per sample, each line fsynced.

A kill at any moment loses at most the line being written. Opening the file again reads the records
already there (their ids are skipped on a rerun), cuts a torn last line off (a kill mid-write), and
holds an exclusive lock so that two `synth` processes never append to the same file.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from pocketlm.errors import UserError


class RecordStore:
    """`with RecordStore(path) as store:` store.records (in file order), store.append(record)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        self.ids: set[str] = set()
        self.dropped_partial_line = False
        self._fd: int | None = None

    def __enter__(self) -> RecordStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another `pocketlm synth` is writing {self.path}: wait for it to finish, or choose "
                            "another --out") from None
        self._fd = fd
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: the sample being written when a run was killed
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            self.dropped_partial_line = True
            print(f"synth: dropped a partial last line of {self.path} (a run was stopped while writing it)",
                  file=sys.stderr)
        for number, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{self.path} line {number} is not valid JSON ({exc.msg}): it is not a synth "
                                "output file, or it was edited; choose another --out") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise UserError(f"{self.path} line {number} has no string `id`: it is not a synth output file; "
                                "choose another --out")
            if record["id"] in self.ids:
                raise UserError(f"{self.path} line {number} repeats id {record['id']}: the file was edited or "
                                "written by two processes; choose another --out")
            self.ids.add(record["id"])
            self.records.append(record)

    def append(self, record: dict) -> None:
        """Write one record as one line, then fsync: after this returns, the record survives a crash."""
        if record["id"] in self.ids:
            raise ValueError(f"record {record['id']} is already in {self.path}")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        size = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(line)
        try:
            while view:  # one write() normally; a short write (signal) continues where it stopped
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:  # e.g. a full disk: take the partial line back, keep every earlier record
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass  # the next run cuts the torn line off instead
            raise UserError(f"cannot write to {self.path} ({exc.strerror}): the {len(self.records)} records "
                            "before it are safe; free space and rerun the same command") from None
        self.ids.add(record["id"])
        self.records.append(record)
