"""VoiceOps releases: an Airflow plugin with the canary release page (nav entry "Releases").

Registers a FastAPI app at ``/voiceops`` (page at ``/voiceops/``, JSON under ``/voiceops/api/``) and a
"Releases" entry in the Airflow UI's Browse menu that opens it in a new tab. Every Airflow component loads plugins, so
this module imports nothing but AirflowPlugin: the app (FastAPI, voice_lib, MLflow client) is imported
by the API server on the first request.

Airflow loads this file by path (as a module named ``__init__``), with the plugins folder on sys.path,
so the app is imported by its package name ``voiceops_release.app``.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/voiceops"


class LazyApp:
    """An ASGI app that imports ``voiceops_release.app`` when the first request arrives."""

    def __init__(self, module: str = "voiceops_release.app") -> None:
        self.module = module
        self._app: Any = None
        self._lock: asyncio.Lock | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self._app is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._app is None:
                    # Off the event loop: the first import reads voice_lib and friends from disk.
                    self._app = (await asyncio.to_thread(importlib.import_module, self.module)).app
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return f"<LazyApp {self.module}:app>"


class VoiceOpsReleasePlugin(AirflowPlugin):
    name = "voiceops_release"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "VoiceOps releases"}]
    external_views = [
        {
            "name": "Releases",
            # Relative (no leading slash), so it follows [api] base_url. Airflow 3.3's UI offers two kinds of entry:
            # - with a url_route it frames the page in an iframe sandboxed without allow-modals, which silently
            #   blocks the confirm()/prompt() that guard the release buttons;
            # - without one it is a link opening a new tab, but as a top-level (nav_top_level) item it renders a
            #   <button href=...> that does nothing when clicked.
            # So: a link without url_route, in the Browse menu (next to Dag Runs, Audit Log, ...).
            "href": "voiceops/",
            "destination": "nav",
            "category": "browse",
            "icon": "voiceops/static/icon.svg",
        }
    ]
