"""A toy fourth scheme for the tests only: "identity" encryption, the plaintext itself framed as bytes.

It proves the scheme contract (``medhe.he.scheme``) carries serving: registered with
``register_scheme("identity", "identity_scheme")``, its models are served by ``medhe serve``, load-tested by the
service benchmark and reported by ``medhe evaluate`` without any change to medhe. It protects nothing: never use it
for data. Same package shape as ckks, tfhe and paillier: ``SCHEME``, ``DEFAULT_MODEL``, ``compile``, ``Client``,
plus the optional ``upload_rules`` hook (exact upload sizes, so the server refuses anything else unread).
"""

from __future__ import annotations

from identity_scheme.client import IdentityClient as Client
from identity_scheme.server import IdentityServerModel, compile, upload_rules

SCHEME = "identity"
DEFAULT_MODEL = "pneumoniamnist"

__all__ = ["SCHEME", "DEFAULT_MODEL", "compile", "Client", "IdentityServerModel", "upload_rules"]
