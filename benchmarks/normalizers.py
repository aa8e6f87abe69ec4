"""Text normalisers side by side on the shipped table (voice_lib/data/text/normalization_cases.tsv).

Each candidate reads every written case; a case passes when its output, canonicalised (lower case, hyphens as
spaces, punctuation dropped, and for Mandarin spaces dropped), equals one of the table's spoken readings.
Candidates that are not installed are skipped; results are merged into benchmarks/results/normalizers.json, so
candidates installed in different environments can be measured one after the other:

    python benchmarks/normalizers.py --candidates handwritten wetext nemo num2words   # a scratch venv with them
    .venv/bin/python benchmarks/normalizers.py --candidates voice_lib                 # the shipped normaliser

``handwritten`` is the regex normaliser that voice_lib shipped until the switch (read from git at 1a42a6e);
``voice_lib`` is what voice_lib.data.text.normalize_text does now. ``--markdown`` prints the docs table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HANDWRITTEN_COMMIT = "1a42a6e"

from voice_lib.data.text.normalize import NormalizationCase, load_cases  # noqa: E402

Normaliser = Callable[[str, str], str]


def handwritten() -> Normaliser:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{HANDWRITTEN_COMMIT}:voice_lib/data/text.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "handwritten_text.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("handwritten_text", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.normalize_text


def wetext() -> Normaliser:
    from wetext import Normalizer

    engines = {lang: Normalizer(lang=lang, operator="tn") for lang in ("en", "zh")}
    return lambda text, lang: engines[lang].normalize(text)


def nemo() -> Normaliser:
    from nemo_text_processing.text_normalization.normalize import Normalizer

    cache = Path(tempfile.gettempdir()) / "nemo_tn_cache"
    engines = {lang: Normalizer(input_case="cased", lang=lang, cache_dir=str(cache)) for lang in ("en", "zh")}
    return lambda text, lang: engines[lang].normalize(text, punct_post_process=True)


def num2words() -> Normaliser:
    """Numbers only, as these libraries do: every digit run through num2words (English) or cn2an (Mandarin)."""
    import cn2an
    from num2words import num2words as spell

    number = re.compile(r"\d+(?:\.\d+)?")
    return lambda text, lang: (number.sub(lambda m: spell(float(m.group()) if "." in m.group() else int(m.group())),
                                          text) if lang == "en" else cn2an.transform(text, "an2cn"))


def voice_lib() -> Normaliser:
    from voice_lib.data.text import normalize_text

    return normalize_text


CANDIDATES: dict[str, Callable[[], Normaliser]] = {
    "handwritten": handwritten, "wetext": wetext, "nemo": nemo, "num2words": num2words, "voice_lib": voice_lib}


def measure(name: str, cases: list[NormalizationCase]) -> dict | None:
    started = time.perf_counter()
    try:
        normalise = CANDIDATES[name]()
    except ImportError as exc:
        print(f"{name}: not installed ({exc}); skipped", file=sys.stderr)
        return None
    for language in ("en", "zh"):  # grammars load on first use: count that as loading, not as a case
        normalise("1", language)
    load_seconds = time.perf_counter() - started
    rows, elapsed = [], 0.0
    for case in cases:
        t0 = time.perf_counter()
        try:
            out = normalise(case.written, case.language)
        except Exception as exc:  # a candidate that crashes on a case fails that case, and the run goes on
            out = f"<{type(exc).__name__}: {exc}>"
        elapsed += time.perf_counter() - t0
        rows.append({"language": case.language, "category": case.category, "written": case.written,
                     "output": out, "pass": case.accepts(out)})
    passed = sum(r["pass"] for r in rows)
    print(f"{name}: {passed}/{len(rows)} pass, load {load_seconds:.2f} s, {elapsed / len(rows) * 1000:.2f} ms/case")
    return {"passed": passed, "cases": len(rows), "load_seconds": round(load_seconds, 3),
            "ms_per_case": round(elapsed / len(rows) * 1000, 3), "rows": rows}


def markdown(results: dict, cases: list[NormalizationCase]) -> str:
    names = [n for n in CANDIDATES if n in results]
    lines = ["| lang | category | written | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for i, case in enumerate(cases):
        cells = []
        for n in names:
            row = results[n]["rows"][i]
            cells.append(("✅ " if row["pass"] else "❌ ") + row["output"].replace("|", "\\|"))
        lines.append(f"| {case.language} | {case.category} | `{case.written}` | " + " | ".join(cells) + " |")
    lines.append("| | | **passed** | " + " | ".join(f"**{results[n]['passed']}/{results[n]['cases']}**"
                                                      for n in names) + " |")
    lines.append("| | | ms per case | " + " | ".join(f"{results[n]['ms_per_case']:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "normalizers.json")
    parser.add_argument("--markdown", action="store_true", help="print the docs table from --out and exit")
    args = parser.parse_args()
    cases = load_cases()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.markdown:
        for name in args.candidates:
            measured = measure(name, cases)
            if measured is not None:
                results[name] = measured
        args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(markdown(results, cases))


if __name__ == "__main__":
    main()
