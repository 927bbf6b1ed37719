"""The generation service (`mole serve`): one loaded MoLE model behind HTTP, in modes base, experts and mole.

* :mod:`mole.serve.schemas`: request/response bodies and their bounds (422 on anything outside them);
* :mod:`mole.serve.service`: loading, the three modes on one pipeline, the bounded queue, timeouts, metrics;
* :mod:`mole.serve.app`: the FastAPI routes, the comparison page (``page.html``) and the uvicorn runner.
"""

from __future__ import annotations

from mole.serve.app import create_app, make_loader, run_server
from mole.serve.service import Service, ServiceSettings

__all__ = ["Service", "ServiceSettings", "create_app", "make_loader", "run_server"]
