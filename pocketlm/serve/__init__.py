"""`pocketlm serve`: an OpenAI-compatible HTTP server for any pocketlm model.

engine.py (request queue + batched decode loop), app.py (FastAPI routes, errors), jobs.py (responses
and SSE), schemas.py (request bodies), chat.py (chat templates), server.py (start-up).
"""

from pocketlm.serve.server import RunningServer, serve, start

__all__ = ["RunningServer", "serve", "start"]
