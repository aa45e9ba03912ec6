"""pocketlm: build, adapt, compress, evaluate and compare small GPT-style language models.

Data flow (one module per stage):
    corpus (data/sources.py) -> token shards (data/prepare.py) -> batches (data/batches.py)
    -> model (model.py) -> training (train.py) -> checkpoints (checkpoint.py)
    -> samples (generate.py) and metrics (eval/) -> study reports
"""

__version__ = "0.1.0"
