"""The demo's release step: the model server on the embedded stack, a little traffic, and a short
canary_promotion run (two steps, short windows) that takes the new version to production."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
from rich.console import Console

from voice_lib.core.config import Settings

DEMO_TEXTS = ["Good morning, how can I help you today?", "Your order has been shipped and arrives tomorrow.",
              "Please hold the line while I check that for you."]


def _traffic(url: str, key: str, voice_id: str, stop: threading.Event, counts: dict) -> None:
    """Requests from many distinct users, so the canary's share follows the weight."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        i = 0
        while not stop.is_set():
            i += 1
            resp = client.post("/v1/tts", json={"text": DEMO_TEXTS[i % len(DEMO_TEXTS)], "voice_id": voice_id,
                                                "user_id": f"demo-user-{uuid.uuid4().hex[:8]}"})
            variant = resp.headers.get("X-Voice-Variant", "none")
            counts[f"{variant}:{resp.status_code}"] = counts.get(f"{variant}:{resp.status_code}", 0) + 1
            if resp.status_code in (429, 503):  # the server's admission control: wait as it says, as clients should
                stop.wait(float(resp.headers.get("Retry-After", "1")))


def short_canary_release(settings: Settings, voice_id: str, version: str, console: Console) -> int:
    from serving.tenants import TenantDirectory
    from voice_lib.release.registry import Registry
    from voiceops import airflow_client, stack

    registry, name = Registry(settings), f"voice-{voice_id}"
    aliases = registry.aliases(name)
    if "production" not in aliases:
        # The first version of a voice has nothing to be compared with: it goes straight to production.
        registry.promote(name, version)
        console.print(f"first version of {name}: v{version} promoted straight to production (no baseline to canary against)")
        return 0
    stack.up(settings, services=("server",))
    url = stack.service_url(settings, "server")
    key, _ = TenantDirectory(settings.resolved_tenants_file).create_key("demo", ["*"], admin=True, can_force_variant=True)
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/readyz", timeout=5).status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    release = settings.release.model_copy(update={"min_requests": 5, "poke_seconds": 3, "server_url": url})
    settings = settings.model_copy(update={"release": release})
    counts: dict[str, int] = {}
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(url, key, voice_id, stop, counts), daemon=True)
    sender.start()
    try:
        conf = {"voice_id": voice_id, "version": str(version), "steps": [50, 100], "window_seconds": 20,
                "quality_probe": False}
        state = airflow_client.dags_test(settings, "canary_promotion", conf, console)
    finally:
        stop.set()
        sender.join(timeout=35)
    console.print(f"demo traffic by variant:status: {counts}")
    if state != "success":
        console.print(f"[red]canary_promotion ended {state}[/red]; `voiceops status {voice_id}` shows why.")
        return 1
    return 0
