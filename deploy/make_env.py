#!/usr/bin/env python3
"""Write .env for docker-compose.yml from .env.example, with every `change-me` value replaced by a fresh secret.

    python3 deploy/make_env.py            # writes ./.env (refuses to overwrite an existing one)
    python3 deploy/make_env.py --stdout   # prints it instead

Only the standard library: runs before any virtualenv exists. Keys ending in FERNET_KEY or ENCRYPTION_KEY get
a Fernet key (32 random bytes, URL-safe base64); everything else gets hex, which is safe inside URLs.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "change-me"
_LINE = re.compile(r"^(?P<key>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def generated(key: str) -> str:
    if key.endswith(("FERNET_KEY", "ENCRYPTION_KEY")):
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    if key.endswith(("_USER", "_KEY_ID")):
        return "vo" + secrets.token_hex(9)  # MinIO: user names/access keys of 3-20 characters
    return secrets.token_hex(24)


def render(template: str) -> str:
    out = []
    for line in template.splitlines():
        match = _LINE.match(line)
        if match and match["value"].startswith(PLACEHOLDER):
            line = f"{match['key']}={generated(match['key'])}"
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render((ROOT / ".env.example").read_text())
    if "--stdout" in argv:
        sys.stdout.write(text)
        return 0
    target = ROOT / ".env"
    if target.exists():
        print(f"{target} exists; not overwriting it (use --stdout to print a new one).", file=sys.stderr)
        return 1
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(f"wrote {target} (mode 0600) with generated secrets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
