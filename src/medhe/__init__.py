"""medhe: encrypted medical image diagnosis (CKKS, TFHE, Paillier) around HE-friendly networks."""

__version__ = "0.1.0"
