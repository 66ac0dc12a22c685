"""``from medhe.client import Client``: the hospital-side SDK of the encrypted diagnosis service."""

from medhe.service.client import Client, Diagnosis

__all__ = ["Client", "Diagnosis"]
