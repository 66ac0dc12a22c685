"""medhe's own CKKS runtime (``medhe.he.ckks._runtime``, C++) behind the ``Backend`` interface.

The server side never needs SEAL for arithmetic: ciphertexts and keys cross the boundary as SEAL's bytes (SEAL
still parses the client's uploads, because that is where the seeds of compact ciphertexts and keys are expanded;
its objects are then read into the runtime's arrays once), and the output leaves as SEAL's bytes, so protocol v1
does not change. Plaintext weights are encoded by SEAL's ``CKKSEncoder`` (floating point: its rounding is SEAL's)
and copied into the runtime once. Key generation, encryption and decryption stay with SEAL (client side, tests).
Every deterministic operation returns residues identical to seal-python's (tests/test_ckks_native.py).

Low-level array API (for other native code paths such as batch mode), on ``NativeBackend(params).ctx``:
``ntt_forward(a, first_prime=0)`` / ``ntt_inverse(a)`` transform a C-contiguous uint64 array (..., limbs, n) in
place, limb i modulo prime ``first_prime + i``; ``ciphertext(a, level, scale)`` / ``plaintext(a, level, scale)``
wrap (2|3, level+1, n) / (level+1, n) residues (NTT form, checked against the primes), ``to_array()`` returns them;
``rescale``, ``multiply``, ``relinearize(ct, keys)``, ``multiply_plain``, ``rotate(ct, step, keys)`` act on those.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from medhe.errors import CiphertextError, SecurityError
from medhe.he.ckks import _runtime  # ImportError when the extension is not built: the registry falls back to seal
from medhe.he.ckks.backends.base import Backend
from medhe.he.ckks.backends.seal import SealBackend
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.wire import serialize

_PLAIN_DATA = 16 + 32 + 8 + 8 + 16 + 8  # SEAL Plaintext bytes: header, parms_id, count, scale, array header, count


def _native_errors(fn):
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:  # _runtime.InputError is a ValueError
            if isinstance(exc, _runtime.InputError):
                raise CiphertextError(f"{exc}: encrypt and create keys with this server's spec") from None
            raise
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def native_context(seal_backend: SealBackend):
    """The runtime's context for ``seal_backend``'s chain (same primes, SEAL's parms_ids for the byte boundary)."""
    rt = _runtime
    if seal_backend.params.hybrid:
        from medhe.he.ckks.hybrid.keys import native_context as hybrid_context

        return hybrid_context(seal_backend.params.layout())
    ctx = seal_backend.context
    key_parms = ctx.key_context_data().parms()
    primes = [m.value() for m in key_parms.coeff_modulus()]
    n = key_parms.poly_modulus_degree()
    pids = [struct.pack("<4Q", *seal_backend.parms_ids[lvl]) for lvl in range(seal_backend.top + 1)]
    key_pid = struct.pack("<4Q", *ctx.key_context_data().parms_id())
    header = key_parms.to_bytes()
    return rt.Context(primes, n.bit_length() - 1, pids, key_pid, header[3], header[4])


class NativeBackend(Backend):
    """CKKS on medhe's C++ runtime. Handles are ``_runtime.Ciphertext`` / ``_runtime.Plaintext``."""

    name = "native"

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.seal = SealBackend(params)  # encoder, SEAL's byte loaders, and (client/tests) keys and decryption
        self.context = self.seal.context
        self.ctx = native_context(self.seal)
        self.slots = self.seal.slots
        self.top = self.seal.top
        self.n = params.poly_degree
        self.galois_keys = None  # _runtime.Keys (Galois and relinearization keys together)
        self.relin_keys = None  # the same object when it holds relinearization keys (Backend's has_relinearization)

    def fresh(self) -> "NativeBackend":
        out = NativeBackend.__new__(NativeBackend)
        out.__dict__.update(self.__dict__)
        out.seal = self.seal.fresh()
        out.galois_keys = out.relin_keys = None
        return out

    @property
    def keys(self):
        return self.galois_keys

    @keys.setter
    def keys(self, value) -> None:
        self.galois_keys = value
        self.relin_keys = value if value is not None and value.has_relin else None

    # -- keys
    def keygen(self, rotation_steps: list[int], relinearization: bool) -> None:
        """Client-side keys (SEAL); the runtime gets the evaluation keys as the server would."""
        self.seal.keygen(rotation_steps, relinearization)
        self.keys = self.keys_from_seal(self.seal.galois_keys, self.seal.relin_keys)

    @_native_errors
    def keys_from_seal(self, galois: Any, relin: Any):
        """SEAL key objects -> the runtime's evaluation keys (either may be ``None``: a plan without rotations or
        without relinearization). For callers that already hold keys SEAL loaded and validated, such as the batch
        boundary's relinearization keys; the returned object is what ``relinearize``/``rotate`` take, and is not
        stored on this backend."""
        g = galois.to_string() if galois is not None and galois.size() else b""
        r = relin.to_string() if relin is not None else b""
        return self.ctx.load_keys(g, r)

    def load_evaluation_keys(self, galois: bytes, relin: bytes, levels: dict[str, Any] | None = None) -> None:
        """Client's compact key bytes (SEAL validates and expands the seeds), then into the runtime."""
        probe = self.seal.fresh()
        probe.load_evaluation_keys(galois, relin, levels)
        self.keys = self.keys_from_seal(probe.galois_keys, probe.relin_keys)

    def galois_element(self, step: int) -> int:
        return self.seal.galois_element(step)

    def has_rotation(self, step: int) -> bool:
        return self.keys is not None and self.galois_element(step) in set(self.keys.galois_elements)

    # -- plaintexts and ciphertexts
    def encode(self, values: np.ndarray | float, level: int, scale: float):
        plain = self.seal.encode(values, level, scale)
        return self.plain_from_seal(plain, level)

    @_native_errors
    def plain_from_seal(self, plain, level: int):
        raw = plain.to_bytes()
        count = (level + 1) * self.n
        if len(raw) != _PLAIN_DATA + 8 * count or raw[16:48] != struct.pack("<4Q", *self.seal.parms_ids[level]):
            raise CiphertextError(f"plaintext is not at level {level}: encode it for the level it is used at")
        data = np.frombuffer(raw, dtype="<u8", count=count, offset=_PLAIN_DATA).reshape(level + 1, self.n)
        return self.ctx.plaintext(data, level, float(plain.scale()))

    @_native_errors
    def from_seal(self, ct):
        return self.ctx.load_ciphertext(ct.to_string())

    def to_seal(self, ct):
        import seal
        out = seal.Ciphertext()
        out.load_bytes(self.context, self.ctx.save_ciphertext(ct))
        return out

    def encrypt(self, plain):
        raise SecurityError("the native backend evaluates only; encrypt with the client's SEAL backend")

    def encrypt_values(self, values: np.ndarray, level: int, scale: float):
        """Client-side helper for tests: SEAL encrypts, the runtime receives the ciphertext."""
        return self.from_seal(self.seal.encrypt(self.seal.encode(values, level, scale)))

    def decrypt(self, ct) -> np.ndarray:
        return self.seal.decrypt(self.to_seal(ct))

    # -- arithmetic (SEAL's semantics)
    @_native_errors
    def add(self, a, b):
        return self.ctx.add(a, b)

    @_native_errors
    def add_inplace(self, a, b) -> None:
        self.ctx.add_inplace(a, b)

    @_native_errors
    def sub(self, a, b):
        return self.ctx.sub(a, b)

    @_native_errors
    def add_plain(self, a, p):
        return self.ctx.add_plain(a, p)

    @_native_errors
    def negate(self, a):
        return self.ctx.negate(a)

    @_native_errors
    def multiply_plain(self, a, p):
        return self.ctx.multiply_plain(a, p)

    @_native_errors
    def multiply(self, a, b):
        return self.ctx.multiply(a, b)

    @_native_errors
    def relinearize(self, a):
        return self.ctx.relinearize(a, self._keys())

    @_native_errors
    def rescale(self, a):
        return self.ctx.rescale(a)

    @_native_errors
    def rotate(self, a, step: int):
        return self.ctx.rotate(a, int(step), self._keys())

    @_native_errors
    def rotate_hoisted(self, a, steps: list[int]):
        """Rotations by several steps sharing one decomposition (decrypts like :meth:`rotate`, other noise)."""
        return self.ctx.rotate_hoisted(a, [int(s) for s in steps], self._keys())

    @_native_errors
    def conjugate(self, a):
        return self.ctx.conjugate(a, self._keys())

    @_native_errors
    def mod_switch(self, a, level: int):
        if a.level == level:
            return a
        return self.ctx.mod_switch(a, int(level))

    def level(self, ct) -> int:
        return ct.level

    def scale(self, ct) -> float:
        return ct.scale

    @_native_errors
    def serialize(self, ct) -> bytes:
        return serialize.compact(self.ctx.save_ciphertext(ct), serialize.KIND_CIPHERTEXT, self.context)

    @_native_errors
    def load_ciphertext(self, data: bytes):
        ct = self.ctx.load_ciphertext(serialize.load_ciphertext(data, self.context).to_string())
        if ct.size != 2:
            raise CiphertextError(f"ciphertext has {ct.size} polynomials, expected 2: send a fresh, "
                                  "relinearized ciphertext")
        return ct

    def compile(self, plan, plains, hoist: bool | str | None = None) -> "NativeProgram":
        """The whole plan as one native call (see :class:`NativeProgram`); ``plains``: its encoded weights."""
        return NativeProgram(self, plan, plains, hoist)

    def _keys(self):
        if self.keys is None:
            raise CiphertextError("no evaluation keys loaded: send the keys created for this server's spec")
        return self.keys



class ThreadChooser:
    """Picks the runtime's thread count (1 or all cores) from the wall time of real runs, and keeps checking.

    Two threads help on an idle 2-core machine and can hurt when the other core is busy (another request, another
    tenant); which holds changes minute to minute. So each choice keeps a moving average of its run time, the
    faster one runs, and every ``explore``-th run tries the other, so a change in load is noticed within a few
    runs. The pool sleeps between jobs, so a wrong guess costs one slow run, never a spinning core.
    ``MEDHE_NATIVE_THREADS`` fixes the count instead.
    """

    def __init__(self, explore: int = 8) -> None:
        import os

        fixed = os.environ.get("MEDHE_NATIVE_THREADS")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.options = [max(1, int(fixed))] if fixed else sorted({1, max(1, cores)})
        self.explore = explore
        self.mean: dict[int, float] = {}
        self.calls = 0

    def pick(self) -> int:
        self.calls += 1
        for option in self.options:
            if option not in self.mean:
                return option
        best = min(self.mean, key=self.mean.get)
        if len(self.options) > 1 and self.calls % self.explore == 0:
            return next(o for o in self.options if o != best)
        return best

    def record(self, option: int, seconds: float) -> None:
        old = self.mean.get(option)
        self.mean[option] = seconds if old is None else 0.7 * old + 0.3 * seconds


class NativeProgram:
    """A plan ready to run natively: weights encoded once (SEAL's encoder), the op list lowered once.

    ``evaluate`` runs the whole plan in one call with the GIL released; with a ``hook`` (debugging) it runs the
    interpreter op by op on :class:`NativeBackend` instead, so every register can be inspected.
    """

    def __init__(self, backend: NativeBackend, plan, plains, hoist: bool | str | None = None) -> None:
        import os

        from medhe.he.ckks.backends.native_program import compile_program

        if hoist is None:  # MEDHE_NATIVE_HOIST: 1/all (default), sum, many, 0/none (bit-identical to SEAL)
            hoist = {"1": True, "0": False}.get(os.environ.get("MEDHE_NATIVE_HOIST", "1"),
                                                os.environ.get("MEDHE_NATIVE_HOIST"))
        self.plan = plan
        self.backend = backend
        self.hoist = hoist
        self.threads = ThreadChooser()
        if len(getattr(plains, "cache", range(len(plains)))) < len(plains):
            # The encoded weights exceed the server's plaintext budget (``runtime.EncodedPlains``): the one-call
            # program needs them all in memory, so run the interpreter on this backend, encoding on use.
            self.plains, self.program, self.lowered = plains, None, None
            return
        self.plains = [plains[i] for i in range(len(plains))]
        self.program, self.lowered = compile_program(self.backend, plan, self.plains, hoist)

    def evaluate(self, keys, cts: list[Any], hook=None):
        if keys is None:
            raise CiphertextError("keys must come from load_keys() of this server model")
        if hook is None and self.program is None:
            from medhe.he.ckks.runtime import run_program

            be = self.backend.fresh()
            be.keys = keys
            return run_program(self.plan, be, self.plains, cts, hoist=self.hoist in (True, "all", "many"))
        if hook is not None:
            from medhe.he.ckks.runtime import run_program

            be = self.backend.fresh()
            be.keys = keys
            # the hook sees SEAL ciphertexts, as with the seal backend (the client decrypts them for debugging)
            return run_program(self.plan, be, self.plains, cts, lambda reg, ct: hook(reg, be.to_seal(ct)))
        import time

        count = self.threads.pick()
        if _runtime.threads() != count:
            _runtime.set_threads(count)
        try:
            start = time.perf_counter()
            out = self.program.run(list(cts), keys)
            self.threads.record(count, time.perf_counter() - start)
            return out
        except ValueError as exc:
            if isinstance(exc, _runtime.InputError):
                raise CiphertextError(f"the native runtime refused the input ({exc}): encrypt and create keys "
                                      "with this server's spec") from None
            raise
