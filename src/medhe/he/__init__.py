"""Encrypted inference: planning shared by all schemes, one backend module per scheme (ckks, tfhe, paillier)."""

from medhe.he.scheme import SCHEMES, ClientSession, ServerModel, client_for, compile_model, default_model

__all__ = ["SCHEMES", "ClientSession", "ServerModel", "client_for", "compile_model", "default_model"]
