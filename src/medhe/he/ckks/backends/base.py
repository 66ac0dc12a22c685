"""The small operation set a CKKS plan runs on, SEAL-free.

Plans only ever call these methods, so another implementation (medhe's native runtime, a GPU one) runs the same
plan by implementing this interface. Levels are counted like SEAL's chain index: the top data level is
``len(data primes) - 1``, the last is 0. Keys, inputs and outputs stay SEAL's bytes whatever the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Backend(ABC):
    """CKKS operations on opaque ciphertext/plaintext handles, and the evaluation keys they switch with.

    ``galois_keys`` / ``relin_keys`` hold this backend's loaded key objects (opaque, None when absent); the server
    loads each client's keys into a :meth:`fresh` backend and installs them for one evaluation.
    """

    name: str  # registry name ("seal", "native"): reports record which backend ran
    slots: int
    galois_keys: Any = None
    relin_keys: Any = None

    @abstractmethod
    def fresh(self) -> "Backend":
        """A backend of the same kind and parameters without keys (to load one client's keys into)."""

    @abstractmethod
    def load_evaluation_keys(self, galois: bytes, relin: bytes, levels: dict[str, Any] | None = None) -> None:
        """Load the client's keys (SEAL bytes in medhe's compact form, see ``wire.serialize``); with the plan's
        ``levels`` (``Plan.key_levels``), keys trimmed below them are refused with ``CiphertextError``."""

    @abstractmethod
    def has_rotation(self, step: int) -> bool:
        """A Galois key for ``step`` is loaded (0 = complex conjugation)."""

    def has_relinearization(self) -> bool:
        return self.relin_keys is not None

    def galois_element(self, step: int) -> int:
        """SEAL's Galois element of a rotation by ``step`` slots (step 0: complex conjugation, 2N - 1)."""
        two_n = 4 * self.slots
        if step == 0:
            return two_n - 1
        return pow(3, step % self.slots, two_n)

    @abstractmethod
    def encode(self, values: np.ndarray | float, level: int, scale: float) -> Any: ...

    @abstractmethod
    def encrypt(self, plain: Any) -> Any:
        """Secret-key (symmetric) encryption: the client holds the key, and fresh noise is lower than public-key."""

    def encrypt_bytes(self, plain: Any) -> bytes:
        """Encrypt and serialize for upload; backends with a cheaper fresh-ciphertext encoding override it."""
        return self.serialize(self.encrypt(plain))

    @abstractmethod
    def decrypt(self, ct: Any) -> np.ndarray: ...

    @abstractmethod
    def add(self, a: Any, b: Any) -> Any: ...

    @abstractmethod
    def add_inplace(self, a: Any, b: Any) -> None: ...

    @abstractmethod
    def add_plain(self, a: Any, p: Any) -> Any: ...

    @abstractmethod
    def negate(self, a: Any) -> Any: ...

    @abstractmethod
    def multiply_plain(self, a: Any, p: Any) -> Any: ...

    @abstractmethod
    def multiply(self, a: Any, b: Any) -> Any: ...

    @abstractmethod
    def relinearize(self, a: Any) -> Any: ...

    @abstractmethod
    def rescale(self, a: Any) -> Any: ...

    @abstractmethod
    def rotate(self, a: Any, step: int) -> Any: ...

    @abstractmethod
    def conjugate(self, a: Any) -> Any:
        """Complex conjugation of every slot (a Galois automorphism: needs the step-0 Galois key)."""

    @abstractmethod
    def mod_switch(self, a: Any, level: int) -> Any: ...

    @abstractmethod
    def level(self, ct: Any) -> int: ...

    @abstractmethod
    def scale(self, ct: Any) -> float: ...

    @abstractmethod
    def serialize(self, ct: Any) -> bytes: ...

    @abstractmethod
    def load_ciphertext(self, data: bytes) -> Any: ...
