"""The key holder's CKKS client for an encrypted model: the KEYDIR's secret key and its fixed evaluation keys.

A fresh key pair per session (``CKKSClient.keygen``) cannot work here: the server's weights are ciphertexts under
the key set made by ``medhe keygen``, so the client must encrypt, and register evaluation keys, under that one.
"""

from __future__ import annotations

from typing import Any

from medhe.he.ckks.wire import envelope
from medhe.he.ckks.client import CKKSClient
from medhe.he.ckks.encrypted.keys import KeyDir


class KeyHolderClient(CKKSClient):
    def __init__(self, spec: dict[str, Any], keys: KeyDir, where: str = "the server") -> None:
        keys.check_matches(spec, where)  # before anything else: a clear error, not a SEAL failure
        super().__init__(spec)
        self.keys = keys

    def keygen(self) -> None:
        """Loads the KEYDIR's secret key (no new keys: the model's weights are encrypted under these)."""
        self.backend = self.keys.backend()
        self._keyed = True

    def evaluation_keys(self) -> bytes:
        self._need_keys()
        return envelope.pack(envelope.KIND_KEYS, self.plan_id, self.keys.evaluation_key_parts())
