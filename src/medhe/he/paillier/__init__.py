"""Paillier (additively homomorphic, library phe) inference for a private linear head over public features.

The client runs the model's public feature extractor, encrypts the feature vector, and the server evaluates its
private linear layer W x + b on the ciphertexts in fixed point; only the client can decrypt the scores. See
docs/paillier.md for what each side learns, the scale and the error bound.
"""

from medhe.he.paillier.client import PaillierClient
from medhe.he.paillier.server import (DEFAULT_KEY_BITS, MIN_KEY_BITS, PaillierKeys, PaillierServerModel,
                                      affine_map, compile_paillier)

__all__ = ["DEFAULT_KEY_BITS", "MIN_KEY_BITS", "PaillierClient", "PaillierKeys", "PaillierServerModel",
           "affine_map", "compile_paillier"]
