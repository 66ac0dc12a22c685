"""CKKS parameter selection: the smallest secure ring that holds the plan's depth and the values' range.

The chain is ``[first, scale x depth, special]``: every multiplication is followed by a rescale that drops one
``scale``-bit prime, the ``first`` prime is what is left for the output (it needs ``scale`` bits of precision
plus headroom for the largest magnitude the activation ranges predict), and the ``special`` prime only serves key
switching (a large one keeps rotation noise low). Everything goes through the 128-bit table before SEAL sees it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from medhe.errors import PlanError, SecurityError
from medhe.he.security import MAX_MODULUS_BITS_128, check_rlwe_128

#: ring degree -> (scale bits, preferred special prime bits, smallest special prime accepted); 8192 follows the
#: measured [35, 28 x 5, 43] design, giving special-prime bits to the first prime when the output range needs them.
PRESETS = {8192: (28, 43), 16384: (30, 50), 32768: (32, 60)}
MIN_SPECIAL = {8192: 40, 16384: 45, 32768: 50}
MIN_HEADROOM_BITS = 7  # the first prime is at least scale + 7 bits
MAX_SCALE_BITS = 50  # beyond this SEAL's 60-bit primes leave too little headroom
SCALE_SLACK = 1  # the scale may drop this many bits below the preset when that buys output headroom
MIN_OUTPUT_SCALE_BITS = 20  # the output keeps >= 20 fractional bits (absolute precision ~1e-6)


@dataclass(frozen=True)
class CKKSParams:
    """A concrete CKKS parameter set (JSON-able through :meth:`to_dict`).

    ``specials``/``alpha``: SEAL's key format has one special prime and a digit per data prime (``alpha`` 0). A
    hybrid chain (issue 29, ``medhe.he.ckks.hybrid``) ends in ``specials`` special primes and groups ``alpha``
    data primes per key digit; its keys travel in key envelope version 2. Both fields stay out of
    :meth:`to_dict` for SEAL's format, so those specs and plan ids are unchanged.
    """

    poly_degree: int
    prime_bits: tuple[int, ...]  # data primes, first (kept to the end) first, then the special prime(s) last
    scale_bits: int
    specials: int = 1
    alpha: int = 0

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    @property
    def data_bits(self) -> tuple[int, ...]:
        return tuple(self.prime_bits[:-self.specials])

    @property
    def depth(self) -> int:
        """Rescales available: one per data prime after the first."""
        return len(self.prime_bits) - self.specials - 1

    @property
    def hybrid(self) -> bool:
        return self.alpha > 0

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prime_bits"] = list(self.prime_bits)
        if not self.hybrid:
            del d["specials"], d["alpha"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CKKSParams":
        try:
            params = cls(int(d["poly_degree"]), tuple(int(b) for b in d["prime_bits"]), int(d["scale_bits"]),
                         int(d.get("specials", 1)), int(d.get("alpha", 0)))
        except (KeyError, TypeError, ValueError):
            raise PlanError("the CKKS spec has no valid 'params' (poly_degree, prime_bits, scale_bits); "
                            "fetch the spec again from the server") from None
        params.validate()
        return params

    def layout(self):
        """The hybrid key-switching layout of this chain (``HybridLayout``, checked); hybrid chains only."""
        from medhe.he.ckks.hybrid.layout import HybridLayout

        if not self.hybrid:
            raise PlanError("this chain uses SEAL's key format, not hybrid keys")
        primes = coeff_modulus(self.poly_degree, tuple(self.prime_bits))
        k = self.specials
        return HybridLayout(self.poly_degree, primes[:-k], primes[-k:], self.alpha).check()

    def validate(self) -> None:
        check_rlwe_128(self.poly_degree, self.prime_bits)  # every prime, the special ones included
        if not 1 <= self.specials < len(self.prime_bits) - 1 or (self.specials != 1 and not self.hybrid):
            raise PlanError(f"a CKKS chain has 1 special prime (SEAL's keys) or several with hybrid keys (alpha "
                            f"> 0), and at least two data primes; got {self.specials} of {len(self.prime_bits)}")
        if len(self.prime_bits) < 3:
            raise PlanError(f"a CKKS chain needs at least 3 primes (first, one level, special), got {self.prime_bits}")
        if any(b > 60 or b < 20 for b in self.prime_bits):
            raise PlanError(f"CKKS primes must have 20 to 60 bits, got {list(self.prime_bits)}")
        if self.hybrid:
            self.layout()  # special primes covering each digit, distinct primes


def max_depth(poly_degree: int, headroom_bits: int = MIN_HEADROOM_BITS) -> int:
    """Deepest chain the ring allows at 128 bits (smallest scale medhe uses, minimal first prime)."""
    scale_bits = PRESETS[poly_degree][0] - SCALE_SLACK
    first = scale_bits + headroom_bits
    return (MAX_MODULUS_BITS_128[poly_degree] - max(MIN_SPECIAL[poly_degree], first) - first) // scale_bits


def magnitude_bits(max_abs: float | None) -> int:
    """Integer bits (sign included) that values up to ``max_abs`` need."""
    if not max_abs or not math.isfinite(max_abs) or max_abs < 1:
        return 1
    return math.ceil(math.log2(max_abs)) + 1


def headroom_for(max_abs: float | None, scale_bits: int = 28) -> int:
    """Bits above the scale the first prime needs so that outputs up to ``max_abs`` decode.

    The last linear layer encodes its output at a smaller scale when the output range needs it (see
    :func:`output_scale_bits`), so the first prime only grows when even that would cost too much precision.
    """
    need = MIN_OUTPUT_SCALE_BITS + magnitude_bits(max_abs) + 1
    return min(60 - scale_bits, max(MIN_HEADROOM_BITS, need - scale_bits))


def output_scale_bits(params: "CKKSParams", max_abs: float | None) -> int:
    """Scale of the final output: the standard scale, lowered so ``max_abs`` fits the first prime with a bit spare."""
    return min(params.scale_bits, params.prime_bits[0] - 1 - magnitude_bits(max_abs))


def choose_params(depth: int, max_abs: float | None = None, poly_degree: int | None = None,
                  scale_bits: int | None = None, prime_bits: list[int] | None = None) -> CKKSParams:
    """Smallest secure parameters for ``depth`` rescales and values up to ``max_abs``; explicit options win.

    Raises ``SecurityError`` for explicit choices below 128 bits and ``PlanError`` (naming the depth needed and the
    largest depth available) when no secure ring is deep enough.
    """
    if prime_bits is not None:
        if poly_degree is None:
            raise PlanError("prime_bits needs poly_degree as well (e.g. poly_degree=8192)")
        sb = scale_bits or PRESETS.get(int(poly_degree), (28, 0))[0]
        params = CKKSParams(int(poly_degree), tuple(int(b) for b in prime_bits), int(sb))
        params.validate()
        if params.depth < depth:
            raise PlanError(f"the model needs multiplicative depth {depth} but the given chain allows {params.depth}; "
                            "add primes or let medhe choose the parameters")
        return params
    degrees = [int(poly_degree)] if poly_degree else sorted(PRESETS)
    for n in degrees:
        if n not in PRESETS:
            check_rlwe_128(n, [])  # raises for unknown degrees
            raise SecurityError(f"ring degree {n} is not supported for CKKS; use one of {sorted(PRESETS)}")
        sb, special = PRESETS[n]
        if scale_bits:
            sb = int(scale_bits)
        first = min(60, sb + headroom_for(max_abs, sb))
        bits = (first,) + (sb,) * depth + (max(special, first),)
        if sum(bits) <= MAX_MODULUS_BITS_128[n]:
            params = CKKSParams(n, bits, sb)
            params.validate()
            return params
        if poly_degree:
            check_rlwe_128(n, bits)  # explicit ring too small: say so in security terms
    biggest = max(degrees)
    raise PlanError(f"the model needs multiplicative depth {depth} but the largest secure CKKS parameters "
                    f"(N={biggest}, 128-bit) allow depth {max_depth(biggest)}; use fewer activation "
                    "layers or fold more linear layers together")


def params_for_ring(poly_degree: int, depth: int, max_abs: float | None = None,
                    scale_bits: int | None = None) -> CKKSParams | None:
    """The chain for ring ``poly_degree`` with ``depth`` levels, or None when it would exceed 128 bits.

    Spare modulus bits buy precision (CKKS noise is absolute): among the scales up to 50 bits, and with the first
    prime either wide enough for the whole output range or at its minimum (the output layer then uses a lower
    scale), the chain whose *worst* precision (min of the scale and the output scale) is largest wins. Key
    switching noise is absolute too, so a low output scale is as bad as a low scale everywhere.
    """
    preset, special0 = PRESETS[poly_degree]
    best: tuple[int, int, CKKSParams] | None = None
    for sb in ([int(scale_bits)] if scale_bits else range(max(preset, MAX_SCALE_BITS), preset - SCALE_SLACK - 1, -1)):
        for first in (sb + max(MIN_HEADROOM_BITS, magnitude_bits(max_abs) + 1), sb + headroom_for(max_abs, sb)):
            first = min(60, first)
            room = MAX_MODULUS_BITS_128[poly_degree] - first - sb * depth
            special = min(max(special0, first), room, 60)
            if special < max(MIN_SPECIAL[poly_degree], first) or sb < 20:
                continue
            params = CKKSParams(poly_degree, (first,) + (sb,) * depth + (special,), sb)
            worst = min(sb, output_scale_bits(params, max_abs))
            if best is None or (worst, sb) > best[:2]:
                best = (worst, sb, params)
    if best is None:
        return None
    best[2].validate()
    return best[2]


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin: these bases decide every n < 3.3e24, far above SEAL's 61-bit moduli."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in small:
        return True
    if any(n % p == 0 for p in small):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _primes_below(bits: int, factor: int, count: int) -> list[int]:
    """The ``count`` largest primes of exactly ``bits`` bits that are 1 mod ``factor``, largest first."""
    out = []
    value = ((1 << bits) - 1) // factor * factor + 1
    while len(out) < count and value > 1 << (bits - 1):
        if _is_prime(value):
            out.append(value)
        value -= factor
    if len(out) < count:
        raise PlanError(f"there are not {count} NTT-friendly {bits}-bit primes for this ring; use other prime sizes")
    return out


@lru_cache(maxsize=64)
def coeff_modulus(poly_degree: int, prime_bits: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL's ``CoeffModulus.Create(poly_degree, prime_bits)`` returns, computed without SEAL.

    SEAL takes, for each bit size, the largest primes below 2^bits that are 1 mod 2N (so the NTT exists), and hands
    them out smallest first in the order the sizes are listed. The compiler needs the values (scales are exact
    ratios of primes) without loading SEAL; tests check this equals seal-python's choice.
    """
    factor = 2 * int(poly_degree)
    counts: dict[int, int] = {}
    for b in prime_bits:
        counts[int(b)] = counts.get(int(b), 0) + 1
    table = {b: _primes_below(b, factor, c) for b, c in counts.items()}
    return tuple(table[int(b)].pop() for b in prime_bits)


def data_primes(params: CKKSParams) -> list[int]:
    """The data primes' values, first prime first (the special prime(s) excluded)."""
    params.validate()
    return list(coeff_modulus(params.poly_degree, tuple(params.prime_bits))[:-params.specials])
