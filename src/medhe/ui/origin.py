"""Which requests the page's backend answers: those of its own page, nothing else.

The backend holds the hospital's secret keys, and any web page open in the same browser can send requests to
127.0.0.1. So, on every request:

- ``Host`` must name this page exactly: 127.0.0.1 or localhost *and* the port it listens on (another port of
  127.0.0.1 is another program; a foreign name is DNS rebinding);
- ``Origin``, when the browser sends one, must be this page's own origin: ``http://`` + that same Host;
- every state-changing call (POST, PUT, PATCH, DELETE) carries the page's token in ``X-Medhe-Page-Token``, which
  only a page served by this backend knows (it is written into ``index.html``), and the exact content type its
  route takes: text/plain and form bodies, which a foreign page can send without a CORS preflight, are refused.

The token is 32 bytes from the OS CSPRNG (``secrets``), made once per backend (one page server, one clinician).
"""

from __future__ import annotations

import hmac
import secrets

TOKEN_HEADER = "X-Medhe-Page-Token"
PAGE_HOSTS = ("127.0.0.1", "localhost")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def page_hosts(port: int | None) -> set[str]:
    """The Host values of this page: ``127.0.0.1:PORT`` and ``localhost:PORT`` (bare names on port 80)."""
    if port is None:
        return set()
    hosts = {f"{name}:{port}" for name in PAGE_HOSTS}
    return hosts | set(PAGE_HOSTS) if port == 80 else hosts


def refusal(method: str, host: str | None, origin: str | None, token: str | None, content_type: str | None,
            port: int | None, expected_token: str, expected_type: str | None) -> tuple[int, str] | None:
    """(status, one sentence) when the request is not this page's own, else None."""
    page = f"http://127.0.0.1:{port}/" if port else "the address medhe ui printed"
    host = (host or "").strip().lower()
    if host not in page_hosts(port):
        return 403, f"medhe ui answers only its own page ({page}); open that address in this computer's browser"
    if origin is not None and origin.strip().lower() != f"http://{host}":
        return 403, (f"medhe ui answers only its own page ({page}), not a page from {origin[:100]}; open that "
                     "address in this computer's browser")
    if method.upper() in SAFE_METHODS:
        return None
    if not token or not hmac.compare_digest(token.encode(), expected_token.encode()):
        return 403, f"this request did not come from the medhe ui page (no valid page token); reload {page}"
    if expected_type is not None and (content_type or "").split(";")[0].strip().lower() != expected_type:
        return 415, f"medhe ui takes {expected_type} here, not {content_type or 'a body without a type'}; reload {page}"
    return None
