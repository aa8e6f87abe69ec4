"""Security checks of the model server (docs/security.md says what each one guarantees).

- API keys: only their SHA-256 is on disk, looked up in constant time; a revoked key stops working on the
  running server.
- Tenant isolation on every route: the routes of the live /openapi.json and of ``app.routes`` must all be in
  ``ROUTES`` below (a new endpoint fails this file until someone decides who may call it), and each class
  is checked: tenant routes refuse missing/wrong keys and answer another tenant's voice exactly like an
  unknown one; admin routes refuse non-admin keys; the webhook needs MLflow's signature; probes name no voice.
- Webhooks: unsigned, wrongly signed, tampered, replayed (old timestamp) and duplicate deliveries are
  refused or deduplicated, and none of them triggers a reload.
- No secrets in the server log, the audit database, any file of the server's home, /metrics,
  /v1/admin/status or any response of this module; Settings masks its secrets; the CLI prints none.
- The pip-audit ignore list of ``make audit`` is justified line by line in docs/security.md.

One real server (tests/serving_stack.py) over the session's MLflow, started with fake credentials in every
secret setting and a password in the MLflow URI. It polls the registry once an hour, so a reload happens only
when this file asks for one (admin reload, webhook): that is how "no reload was triggered" is observed.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from conftest import free_port
from pydantic import BaseModel, SecretStr
from serving_stack import SECRET, TEXT, ServerStack, chunked_post, make_adapter, running_stack

from serving.tenants import TenantDirectory, stable_bucket
from voice_lib.core.config import Settings

REPO = Path(__file__).resolve().parent.parent

# --- every route and who may call it ----------------------------------------------------------------------

PUBLIC, TENANT, ADMIN, WEBHOOK = "public probe", "tenant key", "admin key", "webhook signature"
# Tenant-key routes that are not synthesis or a voice listing (uploads, a voice's status, deletion, discovery):
# the key checks below cover them; their tenant isolation is tested in tests/test_voices_api.py.
TENANT_API = "tenant key (voices API)"


def _tts_body(voice: str) -> dict:
    return {"text": TEXT, "voice_id": voice}


def _speech_body(voice: str) -> dict:
    return {"model": "voiceops", "input": TEXT, "voice": voice, "response_format": "wav"}


# (method, path) -> (auth class, JSON body naming a voice for routes that take one). Add new routes here,
# with the class they need: test_every_route_has_an_auth_class fails for any route missing from this table.
ROUTES: dict[tuple[str, str], tuple[str, Callable[[str], dict] | None]] = {
    ("POST", "/v1/tts"): (TENANT, _tts_body),
    ("POST", "/v1/audio/speech"): (TENANT, _speech_body),
    ("GET", "/v1/voices"): (TENANT, None),
    ("POST", "/v1/voices"): (TENANT_API, None),  # an upload starts onboarding of the tenant's own voice
    ("GET", "/v1/voices/{voice_id}"): (TENANT_API, None),
    ("DELETE", "/v1/voices/{voice_id}"): (TENANT_API, None),  # the owning tenant (or an admin key)
    ("GET", "/v1/models"): (TENANT_API, None),
    ("GET", "/v1/audio/voices"): (TENANT_API, None),
    ("GET", "/v1/admin/status"): (ADMIN, None),
    ("POST", "/v1/admin/reload"): (ADMIN, None),
    ("POST", "/v1/webhooks/mlflow"): (WEBHOOK, None),
    ("GET", "/livez"): (PUBLIC, None),
    ("GET", "/readyz"): (PUBLIC, None),
    ("GET", "/version"): (PUBLIC, None),
    ("GET", "/metrics"): (PUBLIC, None),
    ("GET", "/openapi.json"): (PUBLIC, None),
    ("GET", "/docs"): (PUBLIC, None),
    ("GET", "/docs/oauth2-redirect"): (PUBLIC, None),
    ("GET", "/redoc"): (PUBLIC, None),
}

# Fake credentials in every secret setting; none may show up anywhere the server writes or answers.
FAKE = {
    "s3_access_key_id": "AKIA" + secrets.token_hex(8).upper(),
    "s3_secret_access_key": secrets.token_urlsafe(30),
    "airflow_password": secrets.token_urlsafe(18),
    "probe_api_key": "vo_" + secrets.token_urlsafe(32),
    "mlflow_password": "mlpw-" + secrets.token_hex(12),
}
FAKE_ENV = {
    "VOICEOPS_S3_ACCESS_KEY_ID": FAKE["s3_access_key_id"],
    "VOICEOPS_S3_SECRET_ACCESS_KEY": FAKE["s3_secret_access_key"],
    "VOICEOPS_AIRFLOW_PASSWORD": FAKE["airflow_password"],
    "VOICEOPS_RELEASE__PROBE_API_KEY": FAKE["probe_api_key"],
}


def _with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://voiceops:{password}@{rest}"


# --- the server ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(mlflow_server: str, tmp_path_factory) -> Iterator[ServerStack]:
    env = {**FAKE_ENV,
           # Registry reads go through basic auth in the URL (MLflow without auth ignores it): the password
           # must stay out of logs and answers.
           "VOICEOPS_MLFLOW_TRACKING_URI": _with_password(mlflow_server, FAKE["mlflow_password"]),
           "VOICEOPS_SERVING__POLL_SECONDS": "3600",  # reloads only when asked: see the webhook test
           "VOICEOPS_SERVING__BREAKER_MIN_REQUESTS": "1000000"}  # routing checks must not see a tripped canary
    with running_stack(mlflow_server, tmp_path_factory.mktemp("security-home"), env=env) as s:
        yield s


@pytest.fixture(scope="module")
def extra_keys() -> dict[str, str]:
    """Keys created while the server runs (some revoked): the secrets test looks for them too."""
    return {}


@pytest.fixture(scope="module")
def seen() -> list[httpx.Response]:
    """Every response this module got from the server: the secrets test searches them all."""
    return []


@pytest.fixture(scope="module")
def client(stack: ServerStack, seen: list[httpx.Response]) -> Iterator[httpx.Client]:
    def keep(response: httpx.Response) -> None:
        response.read()
        seen.append(response)

    with httpx.Client(base_url=stack.url, timeout=60, event_hooks={"response": [keep]}) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def near_misses(key: str) -> list[str]:
    """Keys that are almost right: one character off, truncated, extended, case-changed."""
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    return [flipped, key[:-1], key + "x", key.upper(), key[3:]]


def call(client: httpx.Client, method: str, path: str, headers: dict[str, str] | None = None,
         body: dict | None = None) -> httpx.Response:
    return client.request(method, path, headers=headers or {}, json=body)


def signed(body: bytes, secret: str = SECRET, delivery: str | None = None, ts: int | None = None) -> dict[str, str]:
    """MLflow's own webhook headers (mlflow.webhooks.delivery) for ``body``."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    delivery = delivery or str(uuid.uuid4())
    stamp = str(int(time.time()) if ts is None else ts)
    return {"X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp, body.decode()),
            "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp, "Content-Type": "application/json"}


# --- 1. keys are stored hashed -----------------------------------------------------------------------------

def test_key_lookup_compares_hashes_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    import serving.tenants as tenants

    directory = TenantDirectory(tmp_path / "tenants.json")
    keys = [directory.create_key(f"t{i}", ["*"])[0] for i in range(6)]
    stored = [e["key_sha256"] for e in json.loads(directory.path.read_text())["keys"]]
    assert stored == [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a, b):  # noqa: ANN001 - same signature as hmac.compare_digest
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", spy)
    for presented in (keys[0], keys[-1], near_misses(keys[2])[0], "vo_" + "A" * 43):
        calls.clear()
        directory.authenticate(presented)
        # Every stored entry is compared, whichever matched (no early exit), and only digests are compared.
        assert len(calls) == len(keys), presented
        assert {b for _, b in calls} == set(stored)
        assert all(a == hashlib.sha256(presented.encode()).hexdigest() for a, _ in calls)
        assert not any(presented in a or presented in b for a, b in calls)
    # Nothing in authenticate compares the digest with == (which stops at the first differing byte).
    tree = ast.parse(textwrap.dedent(inspect.getsource(TenantDirectory.authenticate)))
    compared = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In)) for op in n.ops)
                and re.search(r"\b(digest|stored)\b", ast.unparse(n))]
    assert not compared, compared


def test_revoked_key_stops_working_on_the_running_server(stack: ServerStack, client: httpx.Client,
                                                         extra_keys: dict[str, str]) -> None:
    directory = TenantDirectory(stack.settings.resolved_tenants_file)
    key, tenant = directory.create_key("revokee", [stack.a])
    extra_keys["revokee"] = key
    pid = stack.proc.pid
    assert call(client, "GET", "/v1/voices", bearer(key)).json()["voices"][0]["voice_id"] == stack.a  # no restart
    env = {**os.environ, "VOICEOPS_HOME": str(stack.home)}
    listed = subprocess.run([sys.executable, "-m", "voiceops.cli", "keys", "list", "--json"], env=env, cwd=stack.home,
                            capture_output=True, text=True, timeout=60, check=True)
    assert tenant.key_id in listed.stdout and key not in listed.stdout + listed.stderr
    assert hashlib.sha256(key.encode()).hexdigest() not in listed.stdout  # not even the hash is printed
    revoked = subprocess.run([sys.executable, "-m", "voiceops.cli", "keys", "revoke", tenant.key_id], env=env,
                             cwd=stack.home, capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    for path, body in (("/v1/voices", None), ("/v1/tts", _tts_body(stack.a))):
        r = call(client, "POST" if body else "GET", path, bearer(key), body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    assert stack.proc.pid == pid and stack.proc.poll() is None
    assert call(client, "GET", "/v1/voices", bearer(stack.keys["acme"])).status_code == 200  # others unaffected


# --- 2. tenant isolation on every route ----------------------------------------------------------------------

def _app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    from serving.app import create_app

    app = create_app(Settings(home=tmp_path / "home", mlflow_tracking_uri="http://127.0.0.1:9"))
    try:
        found = set()
        for route in app.routes:
            methods = getattr(route, "methods", None) or {"*"}  # a mount or websocket has none: must be listed too
            found |= {(m, route.path) for m in methods if m != "HEAD"}
        return found
    finally:
        app.state.services.audit.close(5)


def test_every_route_has_an_auth_class(stack: ServerStack, client: httpx.Client, tmp_path: Path) -> None:
    spec = call(client, "GET", "/openapi.json").json()
    live = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if m.upper() in
            ("GET", "POST", "PUT", "PATCH", "DELETE")}
    in_app = _app_routes(tmp_path)
    unclassified = (live | in_app) - ROUTES.keys()
    assert not unclassified, f"routes without an entry in ROUTES (decide who may call them): {sorted(unclassified)}"
    assert live <= in_app
    assert ROUTES.keys() <= in_app, f"ROUTES lists routes the app no longer has: {sorted(ROUTES.keys() - in_app)}"
    # The schema says the same: tenant and admin routes declare the bearer scheme, the others do not.
    for (method, path), (auth, _) in ROUTES.items():
        op = spec["paths"].get(path, {}).get(method.lower())
        if op is not None:
            assert bool(op.get("security")) == (auth in (TENANT, TENANT_API, ADMIN)), (method, path)


def test_tenant_and_admin_routes_refuse_missing_and_wrong_keys(stack: ServerStack, client: httpx.Client) -> None:
    acme = stack.keys["acme"]
    wrong = [{}, bearer("vo_" + secrets.token_urlsafe(32)), {"Authorization": "Bearer"}, {"Authorization": acme},
             {"Authorization": f"Basic {acme}"}, {"Authorization": f"Token {acme}"}, {"X-Api-Key": acme},
             *[bearer(k) for k in near_misses(acme)]]
    for (method, path), (auth, body) in ROUTES.items():
        if auth not in (TENANT, TENANT_API, ADMIN):
            continue
        for headers in wrong:
            r = call(client, method, path, headers, body(stack.a) if body else None)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
            assert stack.a not in r.text and stack.b not in r.text
        if method == "POST":  # authentication comes before validation: no schema hints without a key
            r = call(client, method, path, {}, {"nonsense": ["x"] * 3})
            assert r.status_code == 401, (path, r.text)


def test_another_tenants_voice_is_indistinguishable_from_an_unknown_one(stack: ServerStack, client: httpx.Client) -> None:
    unknown = "srv-x-" + stack.a.rsplit("-", 1)[1]  # same length as stack.a: same Content-Length too
    assert len(unknown) == len(stack.a) and unknown not in (stack.a, stack.b)
    volatile = {"date", "x-request-id"}

    def shape(r: httpx.Response, voice: str) -> tuple:
        return (r.status_code, r.text.replace(voice, "<voice>"),
                sorted((k, v.replace(voice, "<voice>")) for k, v in r.headers.items() if k not in volatile))

    for (method, path), (auth, body) in ROUTES.items():
        if auth != TENANT:
            continue
        if body is None:  # a listing: only the caller's voices, nothing about others anywhere in the answer
            for key, own, other in (("globex", stack.b, stack.a), ("acme", stack.a, stack.b)):
                r = call(client, method, path, bearer(stack.keys[key]))
                assert r.status_code == 200 and [v["voice_id"] for v in r.json()["voices"]] == [own], r.text
                assert other not in r.text and other not in str(r.headers)
            continue
        own = call(client, method, path, bearer(stack.keys["globex"]), body(stack.b))
        assert own.status_code == 200 and stack.a not in str(own.headers), own.text  # the key itself works
        others = call(client, method, path, bearer(stack.keys["globex"]), body(stack.a))
        missing = call(client, method, path, bearer(stack.keys["globex"]), body(unknown))
        assert others.status_code == 404 and others.json()["error"]["code"] == "voice_not_found", others.text
        assert shape(others, stack.a) == shape(missing, unknown), (path, others.text, missing.text)
        assert others.headers["X-Voice-Version"] == others.headers["X-Voice-Variant"] == "none"
        # Nor can acme reach globex's voice: isolation holds both ways.
        assert call(client, method, path, bearer(stack.keys["acme"]), body(stack.b)).status_code == 404
    speech = {**_speech_body(stack.a), "voice": {"id": stack.a}}  # the OpenAI object form of `voice`
    r = call(client, "POST", "/v1/audio/speech", bearer(stack.keys["globex"]), speech)
    assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"


def test_admin_routes_refuse_tenant_keys(stack: ServerStack, client: httpx.Client) -> None:
    for (method, path), (auth, _) in ROUTES.items():
        if auth != ADMIN:
            continue
        for key in ("acme", "globex"):  # acme may even force variants: still not an admin
            r = call(client, method, path, bearer(stack.keys[key]))
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, key, r.text)
            assert stack.a not in r.text and stack.b not in r.text
        assert call(client, method, path, bearer(stack.keys["ops"])).status_code == 200
    # API keys do not sign webhooks, not even the admin's.
    r = call(client, "POST", "/v1/webhooks/mlflow", bearer(stack.keys["ops"]), {"entity": "model_version_alias"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"


def _register_unloadable_voice(stack: ServerStack) -> str:
    """A production version whose lineage names a base the server does not have: it fails to load."""
    from voice_lib.core.tracking import experiment_id, mlflow_client

    voice = f"srv-c-{uuid.uuid4().hex[:8]}"
    folder = make_adapter(stack.base, stack.work / voice, 9)
    mlflow = mlflow_client(stack.settings)
    run_id = mlflow.create_run(experiment_id(mlflow, f"voice-{voice}")).info.run_id
    mlflow.log_artifacts(run_id, str(folder), "voice")
    tags = {**stack.lineage, "gates_passed": "true", "base_sha256": "e" * 64, "training_key": f"{voice}-unloadable"}
    version = stack.registry.register(f"voice-{voice}", run_id, "voice", tags).version
    stack.registry.promote(f"voice-{voice}", version)
    return voice


def test_probes_answer_without_a_key_and_name_no_voice(stack: ServerStack, client: httpx.Client) -> None:
    broken = _register_unloadable_voice(stack)
    reload = call(client, "POST", "/v1/admin/reload", bearer(stack.keys["ops"]))
    assert any(broken in e for e in reload.json()["errors"]), reload.text
    status = call(client, "GET", "/v1/admin/status", bearer(stack.keys["ops"])).json()
    assert broken in status["last_error"]  # the detail is there, for admins
    for (method, path), (auth, _) in ROUTES.items():
        if auth != PUBLIC:
            continue
        for headers in ({}, bearer("vo_" + secrets.token_urlsafe(32))):  # a key changes nothing on a probe
            r = call(client, method, path, headers)
            assert r.status_code == 200, (path, r.text)
            if path != "/metrics":
                assert not {stack.a, stack.b, broken} & set(re.findall(r"srv-[a-z]-[0-9a-f]{8}", r.text)), (path, r.text)
    ready = call(client, "GET", "/readyz").json()
    assert ready["status"] == "ready" and ready["degraded"] is True and "/v1/admin/status" in ready["error"]
    # /metrics labels series by voice: Prometheus scrapes each replica directly and the balancer hides it.
    nginx = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    assert re.search(r"location = /metrics \{\s*return 404;\s*\}", nginx)


def test_variant_override_is_ignored_without_the_right(stack: ServerStack, client: httpx.Client,
                                                        extra_keys: dict[str, str]) -> None:
    key, tenant = TenantDirectory(stack.settings.resolved_tenants_file).create_key("initech", [stack.a])
    extra_keys["initech"] = key
    assert not tenant.can_force_variant
    weight = stack.status()["voices"][stack.a]["effective_canary_weight"]
    assert 0 < weight < 100
    prod_user = next(f"u{i}" for i in range(1000) if stable_bucket(f"u{i}") >= weight)
    canary_user = next(f"u{i}" for i in range(1000) if stable_bucket(f"u{i}") < weight)

    def variant(key: str, user: str, path: str = "/v1/tts", headers: dict | None = None, cookie: str | None = None) -> str:
        body = ({**_tts_body(stack.a), "user_id": user} if path == "/v1/tts" else {**_speech_body(stack.a), "user": user})
        cookies = {"Cookie": f"voice_variant={cookie}"} if cookie else {}
        r = client.post(path, json=body, headers={**bearer(key), **(headers or {}), **cookies})
        assert r.status_code == 200, r.text
        return r.headers["X-Voice-Variant"]

    for path in ("/v1/tts", "/v1/audio/speech"):
        assert variant(key, prod_user, path) == "production" and variant(key, canary_user, path) == "canary"
        assert variant(key, prod_user, path, {"X-Voice-Variant": "canary"}) == "production"
        assert variant(key, prod_user, path, cookie="canary") == "production"
        assert variant(key, canary_user, path, {"X-Voice-Variant": "production"}) == "canary"
        # The same request with a key that has the right is honoured: the header itself works.
        assert variant(stack.keys["acme"], prod_user, path, {"X-Voice-Variant": "canary"}) == "canary"


# --- 3. webhook signatures -------------------------------------------------------------------------------------

def test_webhooks_refuse_bad_signatures_and_replays_without_reloading(stack: ServerStack, client: httpx.Client) -> None:
    from serving.routers.admin import WEBHOOK_TOLERANCE_S

    def attempts() -> float:
        return stack.status()["last_attempt_at"]

    def settled() -> float:  # the time of the last reload, once no reload is running or pending
        last = attempts()
        time.sleep(1.0)
        assert attempts() == last, "a reload happened by itself: is serving.poll_seconds still 3600?"
        return last

    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": f"voice-{stack.a}", "alias": "production", "version": "1"}}).encode()
    good = signed(body)
    now = int(time.time())
    bad = {
        "no headers": ({"Content-Type": "application/json"}, body),
        "no signature": ({k: v for k, v in good.items() if k != "X-MLflow-Signature"}, body),
        "no delivery id": ({k: v for k, v in good.items() if k != "X-MLflow-Delivery-Id"}, body),
        "no timestamp": ({k: v for k, v in good.items() if k != "X-MLflow-Timestamp"}, body),
        "wrong secret": (signed(body, secret="not-the-secret"), body),
        "tampered body": (good, body.replace(b'"1"', b'"2"')),
        "other delivery id": ({**good, "X-MLflow-Delivery-Id": str(uuid.uuid4())}, body),
        "unsigned version": ({**good, "X-MLflow-Signature": "v2," + good["X-MLflow-Signature"][3:]}, body),
        "replayed, too old": (signed(body, ts=now - WEBHOOK_TOLERANCE_S - 30), body),
        "from the future": (signed(body, ts=now + WEBHOOK_TOLERANCE_S + 30), body),
        "odd digits": (signed(body, ts=now) | {"X-MLflow-Timestamp": "\u00b2".encode("latin-1")}, body),  # '²'.isdigit()
    }
    before = settled()
    for what, (headers, content) in bad.items():
        r = client.post("/v1/webhooks/mlflow", content=content, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature", (what, r.status_code, r.text)
        assert SECRET not in r.text
    # Regression: a timestamp of over 4,300 digits raised inside int() and answered 500.
    for giant in ("9" * 5000, "1" * 13, str(now) + "0" * 4400):
        r = client.post("/v1/webhooks/mlflow", content=body, headers={**signed(body, ts=now), "X-MLflow-Timestamp": giant})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_timestamp", (len(giant), r.text)
        assert "at most 12 digits" in r.json()["error"]["message"]
    assert settled() == before, "a refused webhook triggered a reload"

    first = client.post("/v1/webhooks/mlflow", content=body, headers=good)
    assert first.status_code == 202 and first.json() == {"status": "reload scheduled",
                                                          "delivery_id": good["X-MLflow-Delivery-Id"]}
    stack.wait("the webhook's reload", lambda: attempts() > before, 15)
    after = settled()
    again = client.post("/v1/webhooks/mlflow", content=body, headers=good)  # the same delivery, resent
    resigned = client.post("/v1/webhooks/mlflow", content=body,  # same id, fresh timestamp (MLflow's retry)
                           headers=signed(body, delivery=good["X-MLflow-Delivery-Id"]))
    for r in (again, resigned):
        assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text
    assert settled() == after, "a duplicate delivery triggered a second reload"


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(stack: ServerStack) -> None:
    """Regression: the size check read only Content-Length, so a chunked upload streamed into memory without
    bound before the key was even checked (and the webhook read its whole body before the signature)."""
    cases = {"/v1/tts": {"Authorization": f"Bearer {stack.keys['acme']}"},
             "/v1/audio/speech": {},  # no key at all: the body is refused before authentication could run
             "/v1/webhooks/mlflow": {"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Delivery-Id": "d",
                                     "X-MLflow-Timestamp": str(int(time.time()))}}
    for path, headers in cases.items():
        status, body = chunked_post(stack.url, path, headers, chunks=1)  # one 64 KiB chunk, and no end
        assert status == 413 and body["error"]["code"] == "request_too_large", (path, status, body)
        assert "over the limit" in body["error"]["message"]
    status, _ = chunked_post(stack.url, "/v1/tts", cases["/v1/tts"], chunks=160)  # 10 MiB offered
    assert status == 413
    assert httpx.get(f"{stack.url}/livez", timeout=10).status_code == 200


# --- 4. no secrets in logs, audit rows, files or answers -----------------------------------------------------------

def _secret_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None:
            found += _secret_fields(nested, prefix + (name,))
        elif "SecretStr" in str(annotation) or annotation is SecretStr:
            found.append(prefix + (name,))
    return found


def test_settings_mask_every_secret(tmp_path: Path) -> None:
    fields = _secret_fields(Settings)
    assert {f[-1] for f in fields} >= {"s3_access_key_id", "s3_secret_access_key", "airflow_password",
                                       "webhook_secret", "probe_api_key"}
    # A setting whose name says it is a secret must be a SecretStr (so it is masked like the others).
    def names(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
        for name, field in model.model_fields.items():
            a = field.annotation
            if isinstance(a, type) and issubclass(a, BaseModel):
                yield from names(a, prefix + (name,))
            else:
                yield prefix + (name,)
    # webhook_url: a chat webhook URL carries its token in the path (release.alert_webhook_url)
    secretish = {n for n in names(Settings)
                 if re.search(r"password|secret|token|api_key|access_key|webhook_url", n[-1])}
    assert secretish <= set(fields), f"secret-looking settings that are not SecretStr: {secretish - set(fields)}"

    values = {f: f"{f[-1]}-{secrets.token_hex(8)}" for f in fields}
    kwargs: dict = {"home": tmp_path}
    for path, value in values.items():
        target = kwargs
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    settings = Settings(**kwargs)
    for path, value in values.items():  # the values are really set...
        obj = settings
        for part in path:
            obj = getattr(obj, part)
        assert obj.get_secret_value() == value
    shown = [repr(settings), str(settings), settings.model_dump_json(), json.dumps(settings.model_dump(mode="json")),
             repr(settings.serving), repr(settings.release)]
    for text in shown:  # ... and never shown
        assert not [v for v in values.values() if v in text], text
    assert "**********" in settings.model_dump_json()


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "voiceops.cli", *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=120)
    return r.stdout + r.stderr


def _cli_env(home: Path) -> dict[str, str]:
    ports = {"VOICEOPS_MLFLOW_PORT": free_port(), "VOICEOPS_AIRFLOW_PORT": free_port(),
             "VOICEOPS_SERVING__PORT": free_port()}  # nothing listens there: status says "stopped"
    return {**os.environ, **FAKE_ENV, **{k: str(v) for k, v in ports.items()}, "VOICEOPS_HOME": str(home),
            "VOICEOPS_SERVING__WEBHOOK_SECRET": SECRET, "COLUMNS": "200"}


def test_cli_status_prints_no_secret(tmp_path: Path) -> None:
    env = {**_cli_env(tmp_path / "home"),
           "VOICEOPS_MLFLOW_TRACKING_URI": _with_password(f"http://127.0.0.1:{free_port()}", FAKE["mlflow_password"])}
    out = _cli(["status"], env, tmp_path) + _cli(["keys", "list"], env, tmp_path)
    assert "mlflow" in out and "stopped" in out, out
    leaked = [name for name, value in {**FAKE, "webhook": SECRET}.items() if value in out]
    assert not leaked, out


def test_placeholder_secrets_are_refused_at_start_up(tmp_path: Path) -> None:
    """Regression: the change-me values of .env.example started a stack whose credentials everyone knows."""
    from voice_lib.core.config import PlaceholderSecretError, Settings, refuse_placeholder_secrets

    env = {**_cli_env(tmp_path / "home"), "VOICEOPS_S3_SECRET_ACCESS_KEY": "change-me-s3-secret-key",
           "VOICEOPS_SERVING__AUDIT_URL": "postgresql+psycopg://audit:change-me-audit-db@127.0.0.1:1/audit"}
    for command in (["serve", "--port", str(free_port())], ["status"]):
        r = subprocess.run([sys.executable, "-m", "voiceops.cli", *command], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode == 2, out[-2000:]
        assert "s3_secret_access_key, serving.audit_url (password) still hold the 'change-me' placeholder" in out
        assert "make_env.py" in out and FAKE["s3_access_key_id"] not in out  # names settings, never values
    with pytest.raises(PlaceholderSecretError, match="airflow_password still holds"):
        refuse_placeholder_secrets(Settings(home=tmp_path, airflow_password="Change-Me-airflow"))
    assert refuse_placeholder_secrets(Settings(home=tmp_path, airflow_password="a-real-one")).airflow_password


def test_cli_registry_errors_hide_the_password_of_the_mlflow_uri(tmp_path: Path) -> None:
    env = {**_cli_env(tmp_path / "home"),
           "VOICEOPS_MLFLOW_TRACKING_URI": _with_password(f"http://127.0.0.1:{free_port()}", FAKE["mlflow_password"])}
    out = _cli(["status", "some-voice"], env, tmp_path)
    assert "not reachable" in out, out
    assert FAKE["mlflow_password"] not in out


def _wait_for_audit_row(path: Path, request_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                if db.execute("select 1 from audit_log where request_id = ?", (request_id,)).fetchone():
                    return
        except sqlite3.OperationalError:
            pass
        assert time.monotonic() < deadline, f"audit row {request_id} not written"
        time.sleep(0.2)


def test_no_secret_in_logs_audit_files_metrics_status_or_answers(stack: ServerStack, client: httpx.Client,
                                                                  seen: list[httpx.Response],
                                                                  extra_keys: dict[str, str]) -> None:
    keys = {**stack.keys, **extra_keys}
    # Traffic with every key, good and almost right, on every tenant route and the admin ones.
    for name, key in keys.items():
        if name == "slow":  # 2 requests a minute: one good call is enough
            call(client, "GET", "/v1/voices", bearer(key))
            continue
        for presented in (key, *near_misses(key)):
            for (method, path), (auth, body) in ROUTES.items():
                if auth in (TENANT, ADMIN) and path != "/v1/admin/reload":
                    call(client, method, path, bearer(presented), body(stack.a) if body else None)
    marker = "sec" + uuid.uuid4().hex
    last = call(client, "GET", "/v1/voices", {**bearer(near_misses(keys["acme"])[0]), "X-Request-Id": marker})
    assert last.status_code == 401
    audit_db = stack.home / "audit.db"
    _wait_for_audit_row(audit_db, marker)

    forbidden = {**{f"key {n}": k for n, k in keys.items()},
                 **{f"key {n} without prefix": k[3:] for n, k in keys.items()},
                 **{f"near miss {i} of {n}": m.strip() for n, k in keys.items() for i, m in enumerate(near_misses(k))},
                 "webhook secret": SECRET, **FAKE}
    where: dict[str, str] = {}
    log = stack.log_path.read_text(errors="replace")
    assert "401" in log and "voiceops:***@" in log  # the log saw the traffic, and the URI redacted
    where["server log"] = log
    with sqlite3.connect(f"file:{audit_db}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("select * from audit_log")]
    refused = [r for r in rows if r["status"] == 401]
    assert len(refused) > 50 and all(r["tenant"] is None for r in refused)  # bad keys audited, with no tenant
    where["audit rows"] = "\n".join(map(repr, rows))
    for path in sorted(p for p in stack.home.rglob("*") if p.is_file()):  # tenants file, audit db + WAL, caches...
        where[f"file {path.relative_to(stack.home)}"] = path.read_bytes().decode("latin-1")
    where["/metrics"] = call(client, "GET", "/metrics").text
    where["/v1/admin/status"] = call(client, "GET", "/v1/admin/status", bearer(keys["ops"])).text
    where["/readyz"] = call(client, "GET", "/readyz").text
    for i, r in enumerate(seen):
        where[f"response {i} {r.request.method} {r.request.url.path} {r.status_code}"] = r.text + repr(r.headers)
    assert len(seen) > 100
    leaks = [f"{what} in {place}" for place, text in where.items() for what, value in forbidden.items()
             if value in text]
    assert not leaks, leaks[:20]


# --- 5. dependency audit ------------------------------------------------------------------------------------------

VULN_ID = re.compile(r"\b(?:GHSA(?:-[23456789cfghjmpqrvwx]{4}){3}|PYSEC-\d{4}-\d+|CVE-\d{4}-\d{4,})\b")


def test_make_audit_says_what_it_could_not_check_and_fails_only_on_what_it_could() -> None:
    """scripts/audit.py's verdict on pip-audit's JSON report (the format pip-audit 2.10 writes): an unreachable
    advisory database is said plainly and is no failure (nor a pass: nothing is called clean); a vulnerability in
    an audited package fails; packages that could not be audited are named, and fail only with --strict."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from audit import locked_pins, verdict
    finally:
        sys.path.pop(0)

    pins = locked_pins()
    assert "torch==2.13.0" in pins and not any("+" in p for p in pins)  # audited as PyPI's release of the source
    assert len(pins) >= 250 and any(p.startswith("apache-airflow==") for p in pins)

    def skipped(name: str) -> dict:
        return {"name": name, "skip_reason": f"Dependency not found on PyPI and could not be audited: {name} (1.0)"}

    unreachable, code = verdict({"dependencies": [skipped("numpy"), skipped("torch")], "fixes": []})
    assert code == 0 and any(line.startswith("NOTHING WAS AUDITED") for line in unreachable), unreachable
    assert not any("no known vulnerability in the packages" in line for line in unreachable)
    assert verdict({"dependencies": [skipped("numpy")]}, strict=True)[1] == 1

    clean = {"name": "six", "version": "1.17.0", "vulns": []}
    partial, code = verdict({"dependencies": [clean, skipped("torch")]})
    assert code == 0 and "NOT AUDITED (1): torch" in partial and partial[0].startswith("audited 1 of 2")
    assert verdict({"dependencies": [clean, skipped("torch")]}, strict=True)[1] == 1
    vulnerable = {"name": "mlflow", "version": "3.17.2",
                  "vulns": [{"id": "GHSA-xxxx-yyyy-zzzz", "fix_versions": ["3.18.0"], "aliases": []}]}
    found, code = verdict({"dependencies": [clean, vulnerable, skipped("torch")]})
    assert code == 1 and "VULNERABLE mlflow 3.17.2: GHSA-xxxx-yyyy-zzzz (fixed in: 3.18.0)" in found


def test_every_ignored_vulnerability_is_justified_in_the_docs() -> None:
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony and "audit" in phony.group(1).split()
    recipe = re.search(r"^audit:(.*)\n((?:\t.*\n?|#.*\n|\s*\n)*)", makefile, re.M)
    assert recipe, "no audit target in the Makefile"
    assert "scripts/audit.py --pip-audit" in recipe.group(2)  # the lock files' pins, not whatever is installed
    test_target = re.search(r"^test:(.*)$", makefile, re.M)
    assert test_target and "audit" not in test_target.group(1)  # needs the network: never part of `make test`
    ignored = re.findall(r"--ignore-vuln[ =](\S+)", recipe.group(2))
    assert all(VULN_ID.fullmatch(i) for i in ignored), ignored

    docs = (REPO / "docs" / "security.md").read_text()
    section = docs.split("### Justified findings", 1)
    assert len(section) == 2, "docs/security.md has no '### Justified findings' section"
    table = [line for line in section[1].split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    justified: dict[str, str] = {}
    for line in table[2:]:  # header and separator first
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4, line  # package | id | why it does not apply / why not upgraded | owner action
        for vuln in VULN_ID.findall(cells[1]):
            justified[vuln] = cells[2]
    missing = [i for i in ignored if len(justified.get(i, "")) < 30]
    assert not missing, f"--ignore-vuln ids without a justification in docs/security.md: {missing}"
    stale = sorted(set(justified) - set(ignored))
    assert not stale, f"justified in docs/security.md but not ignored by `make audit` (remove the row?): {stale}"
