"""``caselens serve``: an HTTP API and a web case viewer over the collections of a caselens home.

    from caselens.serve import ServeConfig, create_app
    app = create_app(ServeConfig(home="caselens-data"))      # a FastAPI app (uvicorn, tests)

Modules: :mod:`.config` (settings), :mod:`.auth` (tokens), :mod:`.limits` (uploads, pixels,
rate), :mod:`.middleware` (host check, body limit, metrics, access log), :mod:`.jobs` (ingest
jobs), :mod:`.backend` (the one module calling the library), :mod:`.models` (API schema),
:mod:`.app` (routes), :mod:`.server` (uvicorn and the token commands), ``static/`` (the page).
"""

from caselens.serve.app import create_app
from caselens.serve.config import ServeConfig
from caselens.serve.server import run_server, token_command

__all__ = ["ServeConfig", "create_app", "run_server", "token_command"]
