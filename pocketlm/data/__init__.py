"""Data: corpora (sources.py) -> token shards + manifest (prepare.py) -> training batches (batches.py)."""

from pocketlm.data.prepare import load_manifest, prepare, split_memmaps

__all__ = ["load_manifest", "prepare", "split_memmaps"]
