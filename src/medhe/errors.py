"""One exception family for every failure a user can fix.

The CLI and the HTTP server turn a ``MedheError`` into a one-line message (or a 4xx JSON body), never a traceback,
so each message must say what was wrong and what to do about it.
"""


class MedheError(Exception):
    """A failure the user can act on; ``str(err)`` is the one-line message shown to them."""


class DataError(MedheError):
    """A dataset or image is missing, corrupted or in the wrong layout."""


class ArtifactError(MedheError):
    """A model directory or card is missing, incomplete or inconsistent."""


class SecurityError(MedheError):
    """Parameters below the 128-bit security floor, or key material that must not be used."""


class PlanError(MedheError):
    """A model cannot be compiled for a scheme (unsupported layer, too deep, does not fit)."""


class CiphertextError(MedheError):
    """Ciphertexts or keys are malformed, truncated, or belong to other parameters."""


class OutOfRangeError(DataError):
    """An encrypted result lies outside the range its plan was sized for: the input is far from the training data
    and the approximate (CKKS) arithmetic may have wrapped around, so the result must not be used."""
