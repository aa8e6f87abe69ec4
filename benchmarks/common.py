"""Shared helpers of the serving benchmarks (serving.py, scaling.py, rollback_time.py).

Everything runs on loopback: a private MLflow server (voiceops.stack.up in a temporary home), voices
made from LoRA adapters of the shipped base (voice_lib/assets/base, the real model size; ``Bench(backend=
"two_stage")``: of the shipped converter, with a real two_stage.json each, ``make_two_stage_adapter``) registered
through voice_lib.release.registry.Registry, model servers started as `python -m voiceops.cli serve` in their own
process groups, and a closed-loop load generator with bounded request counts and time limits.

``Bench`` owns every process it starts and stops them (and the MLflow server) on exit, on Ctrl-C and on
SIGTERM; it only ever signals the process groups it created itself.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# The repository root first: benchmarks/serving.py must not shadow the serving package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]

from bench_voices import (  # noqa: E402,F401 - re-exported: the benchmarks take their voices from here
    LORA_B_SCALE,
    LORA_RANK,
    BaseInfo,
    make_adapter,
    make_two_stage_adapter,
    shipped_base,
    shipped_converter,
)

# --- text ---------------------------------------------------------------------------------------------

_NAMES = ["Alice", "Brian", "Carmen", "David", "Elena", "Frank", "Grace", "Henry", "Irene", "James", "Karen", "Louis"]
_ADJ = ["heavy", "small", "yellow", "wooden", "broken", "shiny", "quiet", "ancient", "narrow", "gentle", "purple", "frozen"]
_NOUN = ["package", "letter", "carpet", "bicycle", "painting", "machine", "basket", "window", "lantern", "guitar", "kettle", "mirror"]
_PLACE = ["station", "library", "harbour", "market", "museum", "garden", "airport", "hospital", "theatre", "bakery", "office", "river"]
_DAY = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NUM = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
STREAM_TEXT = ("This is the first sentence of a short answer. Here comes a second one, a little longer than the first. "
               "And a third sentence, to finish the reply.")
SHORT_TEXT = "Hello there, this is a quick test."


def sentence_20(i: int) -> str:
    """The i-th distinct 20-word sentence (deterministic; distinct texts so the frontend cache does not hide phonemisation)."""
    r = random.Random(i)
    text = (f"Please tell {r.choice(_NAMES)} that the {r.choice(_ADJ)} {r.choice(_NOUN)} will arrive again at the "
            f"{r.choice(_PLACE)} on {r.choice(_DAY)} morning, just before {r.choice(_NUM)} o'clock.")
    assert len(text.split()) == 20, text
    return text


# --- machine facts and results ---------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_facts() -> dict[str, Any]:
    import torch

    cpu, mem = "", 0
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "")
        mem = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=False).stdout.strip())
    la = loadavg()
    n = os.cpu_count() or 1
    return {"nproc": n, "loadavg_at_start": la, "under_load": la[0] >= 0.5 * n, "cpu_model": cpu,
            "mem_total_bytes": mem, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads_in_driver": torch.get_num_threads(), "platform": platform.platform(),
            "git_commit": git + ("-dirty" if dirty else ""), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def load_note(facts: dict[str, Any]) -> str:
    la = facts["loadavg_at_start"]
    if facts["under_load"]:
        return (f"MEASURED UNDER LOAD: load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at start on {facts['nproc']} CPUs "
                "(other jobs share the machine); absolute numbers are pessimistic, side-by-side ratios are the result.")
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at start on {facts['nproc']} CPUs"


def write_results(name: str, payload: dict[str, Any], quick: bool, out: Path | None = None) -> Path:
    path = out or RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "loadavg_at_end": loadavg(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (the reference synthesizer runs as a subprocess)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and its waited-for children so far (/proc/<pid>/stat utime..cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (as serving/breaker.py and serving/audit.py compute p95)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# --- processes -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_status_kb(pid: int, field_name: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (/proc/<pid>/status)."""
    kb = _proc_status_kb(pid, "VmRSS")
    if kb is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return kb * 1024


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident memory) of a process."""
    return (_proc_status_kb(pid, "VmHWM") or 0) * 1024


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


class Proc:
    """A child process in its own session (process group == pid), stopped by that group id only."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name, self.log_path = name, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - the child writes to it until stop() closes it
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEOPS_")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra})
    return env


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25,
               proc: Proc | None = None) -> float:
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                               + (f"\n{proc.tail()}" if proc is not None else ""))
        time.sleep(interval)


# --- the bench: MLflow, servers, cleanup ---------------------------------------------------------------

class Bench:
    """Temporary home + private MLflow + the servers a benchmark starts; ``close()`` stops everything."""

    def __init__(self, name: str, keep: bool = False, backend: str = "end_to_end") -> None:
        self.name, self.keep, self.backend = name, keep, backend
        self.home = Path(tempfile.mkdtemp(prefix=f"voiceops-bench-{name}-"))
        self.procs: list[Proc] = []
        self.settings = None
        self._closed = False
        self.base = shipped_converter() if backend == "two_stage" else shipped_base()
        self.tenants_file = self.home / "tenants.json"
        self.key = ""
        self._prev_handlers: dict[int, Any] = {}
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.close()
        raise SystemExit(128 + signum)

    # MLflow ----------------------------------------------------------------------------------
    def start_mlflow(self, extra_env: dict[str, str] | None = None) -> str:
        from serving.tenants import TenantDirectory
        from voice_lib.core.config import Settings
        from voiceops import stack

        os.environ.update(extra_env or {})  # stack.up passes the caller's environment to MLflow
        port = free_port()
        self.settings = Settings(home=self.home / "mlflow-home", mlflow_port=port,
                                 mlflow_tracking_uri=f"http://127.0.0.1:{port}")
        stack.up(self.settings, services=("mlflow",), timeout=180)
        self.key = TenantDirectory(self.tenants_file).create_key("bench", ["*"], admin=True,
                                                                 rate_per_minute=10_000_000)[0]
        return self.settings.mlflow_tracking_uri

    @property
    def registry(self):
        from voice_lib.release.registry import Registry

        return Registry(self.settings)

    def register(self, voice_id: str, folder: Path, registry: Any = None) -> str:
        """Log ``folder`` as a run's artifacts and register it as a new version of voice-<voice_id>."""
        from voice_lib.core.tracking import experiment_id, mlflow_client

        client = mlflow_client(self.settings)
        run_id = client.create_run(experiment_id(client, f"bench-voice-{voice_id}")).info.run_id
        client.log_artifacts(run_id, str(folder), "voice")
        # gates_passed: benchmark versions stand for ones that passed onboarding's gates (promote wants it)
        tags = {**self.base.lineage, "gates_passed": "true", "training_key": f"{voice_id}-{uuid.uuid4().hex[:10]}"}
        return (registry or self.registry).register(f"voice-{voice_id}", run_id, "voice", tags).version

    def make_and_register(self, items: Sequence[tuple[str, int, float]], workers: int = 4,
                          promote: bool = True) -> list[str]:
        """[(voice_id, seed, scale)] -> versions; adapters are made here, registrations run in parallel.
        With ``promote`` each new version becomes its voice's production version (what the server serves)."""
        make = make_two_stage_adapter if self.backend == "two_stage" else make_adapter
        folders = [make(self.base, self.home / "adapters" / f"{voice_id}-{seed}", seed, scale) for voice_id, seed, scale in items]
        local = threading.local()

        def one(args: tuple[tuple[str, int, float], Path]) -> str:
            if not hasattr(local, "registry"):
                local.registry = self.registry
            version = self.register(args[0][0], args[1], local.registry)
            if promote:
                local.registry.promote(f"voice-{args[0][0]}", version)
            return version

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, zip(items, folders)))

    # servers -----------------------------------------------------------------------------------
    def start_server(self, name: str, serving: dict[str, Any], threads: int | None = None,
                     extra_env: dict[str, str] | None = None) -> Server:
        """`voiceops serve` with ``serving`` as VOICEOPS_SERVING__* overrides; ``extra_env`` last (e.g. PYTHONPATH
        of another checkout, to measure the code before a change beside it)."""
        port = free_port()
        home = self.home / f"server-{name}"
        home.mkdir(parents=True, exist_ok=True)
        env = {"VOICEOPS_HOME": str(home), "VOICEOPS_MLFLOW_TRACKING_URI": self.settings.mlflow_tracking_uri,
               "VOICEOPS_SERVING__TENANTS_FILE": str(self.tenants_file)}
        env.update({f"VOICEOPS_SERVING__{k.upper()}": str(v) for k, v in serving.items()})
        if threads:
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        env.update(extra_env or {})
        proc = Proc(name, [sys.executable, "-m", "voiceops.cli", "serve", "--port", str(port), "--host", "127.0.0.1"],
                    child_env(env), home, home / "server.log")
        self.procs.append(proc)
        return Server(name, f"http://127.0.0.1:{port}", proc, self.key, {**serving, "torch_threads": threads or "default"})

    def start_process(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        home = self.home / f"proc-{name}"
        home.mkdir(parents=True, exist_ok=True)
        proc = Proc(name, cmd, child_env(env or {}), home, home / "out.log")
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"stopping {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()
        if self.settings is not None:
            from voiceops import stack

            try:
                stack.down(self.settings)
            except Exception as exc:  # noqa: BLE001
                print(f"stopping MLflow: {exc}", file=sys.stderr)
        if not self.keep:
            shutil.rmtree(self.home, ignore_errors=True)
        else:
            print(f"kept {self.home}", file=sys.stderr)
        for sig, handler in self._prev_handlers.items():
            signal.signal(sig, handler)


@dataclass
class Server:
    """A running `voiceops serve` (or a baseline) process and how to talk to it."""

    name: str
    url: str
    proc: Proc
    key: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/admin/status", headers=self.auth, timeout=10).json()

    def status_plain(self) -> dict[str, Any]:
        """GET /status of a baseline server (no auth)."""
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def reload(self) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/v1/admin/reload", headers=self.auth, timeout=120)
        r.raise_for_status()
        return r.json()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def wait_voices(self, voice_ids: Iterable[str], timeout: float = 300) -> float:
        wanted = set(voice_ids)
        try:
            return wait_until(f"{self.name} serving {len(wanted)} voices",
                              lambda: wanted <= set(self.status().get("voices", {})), timeout, 0.5, self.proc)
        except TimeoutError as exc:
            try:
                st = self.status()
                detail = {k: st.get(k) for k in ("last_error", "degraded", "adapters_loaded", "generation")}
            except (httpx.HTTPError, ValueError) as err:
                detail = {"status": f"unavailable: {err}"}
            raise TimeoutError(f"{exc}\nserver status: {detail}") from None


# --- load ------------------------------------------------------------------------------------------

@dataclass
class Result:
    started: float
    ended: float
    status: int
    audio_seconds: float = 0.0
    first_byte: float | None = None  # streamed: seconds to the first body bytes
    variant: str | None = None
    version: str | None = None
    fallback: bool = False
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


def wav_seconds(body: bytes) -> float:
    import io

    try:
        with wave.open(io.BytesIO(body)) as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError):
        return 0.0


def post_tts(client: httpx.Client, url: str, headers: dict[str, str], body: dict[str, Any],
             timeout: float = 120) -> Result:
    started = time.perf_counter()
    try:
        if body.get("stream"):
            first = None
            n = 0
            with client.stream("POST", f"{url}/v1/tts", json=body, headers=headers, timeout=timeout) as r:
                for chunk in r.iter_bytes():
                    if chunk and first is None:
                        first = time.perf_counter() - started
                    n += len(chunk)
                sr = int(r.headers.get("X-Sample-Rate", "16000"))
                h = r.headers
            audio = max(0, n - 44) / 2 / sr if body.get("format", "wav") == "wav" else n / 2 / sr
            return Result(started, time.perf_counter(), r.status_code, audio, first, h.get("X-Voice-Variant"),
                          h.get("X-Voice-Version"), "X-Voice-Fallback" in h)
        r = client.post(f"{url}/v1/tts", json=body, headers=headers, timeout=timeout)
        ended = time.perf_counter()
        audio = wav_seconds(r.content) if r.status_code == 200 else 0.0
        return Result(started, ended, r.status_code, audio, None, r.headers.get("X-Voice-Variant"),
                      r.headers.get("X-Voice-Version"), "X-Voice-Fallback" in r.headers,
                      None if r.status_code == 200 else r.text[:200])
    except httpx.HTTPError as exc:
        return Result(started, time.perf_counter(), 0, error=f"{type(exc).__name__}: {exc}")


def run_load(url: str, headers: dict[str, str], body_for: Callable[[int], dict[str, Any]], concurrency: int,
             requests: int, max_seconds: float, path_post: Callable[..., Result] = post_tts) -> list[Result]:
    """Closed loop: ``concurrency`` workers send ``requests`` requests in total (body_for(i) for the i-th), each
    waiting for its answer before the next; stops early after ``max_seconds``. Bounded in count and time."""
    counter = iter(range(requests))
    lock = threading.Lock()
    results: list[Result] = []
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        with httpx.Client() as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                res = path_post(client, url, headers, body_for(i))
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 150)
    return sorted(results, key=lambda r: r.started)


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    lat = [r.latency * 1000 for r in ok]
    window = (max(r.ended for r in results) - min(r.started for r in results)) if results else 0.0
    audio = sum(r.audio_seconds for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "mean_ms": statistics.fmean(lat) if lat else None,
            "max_ms": max(lat) if lat else None, "window_s": window,
            "requests_per_s": len(ok) / window if window else None,
            "audio_seconds_per_s": audio / window if window else None,
            "mean_audio_seconds": audio / len(ok) if ok else None,
            "error_samples": sorted({(r.error or str(r.status))[:160] for r in results if r.status != 200})[:3]}


def merge_summaries(parts: Sequence[Sequence[Result]]) -> dict[str, Any]:
    """Latency percentiles over all rounds; throughput as the sum of requests over the sum of round windows."""
    every = [r for p in parts for r in p]
    s = summarize(every)
    windows = [summarize(p)["window_s"] for p in parts if p]
    total = sum(windows)
    ok = [r for r in every if r.status == 200]
    s["window_s"] = total
    s["requests_per_s"] = len(ok) / total if total else None
    s["audio_seconds_per_s"] = sum(r.audio_seconds for r in ok) / total if total else None
    s["per_round_requests_per_s"] = [summarize(p)["requests_per_s"] for p in parts if p]
    return s


def results_json(results: Sequence[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
