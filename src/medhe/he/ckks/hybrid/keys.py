"""Server side of hybrid keys: the client's frames -> SEAL-validated residues -> the native runtime's keys.

Each digit arrives as medhe's compact frame of a seeded SEAL ciphertext in the key context (Q*P); SEAL's loader
checks it and expands the seed, the residues then go to the runtime (which checks every coefficient against its
prime again). The server never holds a secret: everything here is built from the public layout.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from medhe.errors import CiphertextError
from medhe.he.ckks.hybrid import sealctx
from medhe.he.ckks.hybrid.layout import HybridLayout
from medhe.he.ckks.wire import serialize


def native_context(layout: HybridLayout):
    """The runtime's context for ``layout``: primes Q then P, SEAL's parms_ids of the client context's levels."""
    from medhe.he.ckks import _runtime  # ImportError without the native runtime: hybrid keys need it

    ctx = sealctx.client_context(layout)
    pids, data = {}, ctx.first_context_data()
    while data is not None:
        pids[data.chain_index()] = struct.pack("<4Q", *data.parms_id())
        data = data.next_context_data()
    header = ctx.key_context_data().parms().to_bytes()
    key_pid = struct.pack("<4Q", *ctx.key_context_data().parms_id())
    return _runtime.Context(list(layout.primes), layout.poly_degree.bit_length() - 1,
                            [pids[lvl] for lvl in range(layout.levels)], key_pid, header[3], header[4],
                            special_count=len(layout.special_primes))


def key_residues(frames: list[bytes], layout: HybridLayout, what: str) -> np.ndarray:
    """One key's digit frames -> (digits, 2, L + k, n) residues (NTT form); ``CiphertextError`` if malformed.

    A key may carry fewer digits than the chain has (those its highest level reads; see ``wire``).
    """
    if not 1 <= len(frames) <= layout.dnum:
        raise CiphertextError(f"{what} has {len(frames)} digits where this model's chain has {layout.dnum}: "
                              "create the keys with this server's spec")
    context = sealctx.key_context(layout)
    limbs, n = len(layout.primes), layout.poly_degree
    out = np.empty((len(frames), 2, limbs, n), dtype=np.uint64)
    for j, frame in enumerate(frames):
        ct = serialize.load_ciphertext(frame, context)
        if ct.coeff_modulus_size() != limbs or ct.size() != 2:
            raise CiphertextError(f"{what} holds a digit at the wrong level: create the keys with this server's spec")
        out[j] = sealctx.cipher_residues(ct.to_string(), limbs, n)
    return out


def native_keys(native_ctx, layout: HybridLayout, galois: dict[int, Any], relin: Any | None):
    """The runtime's key set (``_runtime.Keys``) from frames: Galois element -> digit frames (or (level, frames)),
    and the relinearization key's the same way, or None.

    Keys are read one at a time, so the peak is the key set plus one key's residues.
    """
    keys = native_ctx.hybrid_keys({}, None, layout.alpha)
    items = [(int(e), f"the Galois key for element {e}", v) for e, v in galois.items()]
    if relin is not None:
        items.append((0, "the relinearization key", relin))
    try:
        for elt, what, value in items:
            level, frames = value if isinstance(value, tuple) else (-1, value)
            native_ctx.add_hybrid_key(keys, elt, key_residues(frames, layout, what), layout.alpha, int(level))
    except ValueError as exc:
        if isinstance(exc, CiphertextError):
            raise
        raise CiphertextError(f"{exc}: create the keys with this server's spec") from None
    return keys
