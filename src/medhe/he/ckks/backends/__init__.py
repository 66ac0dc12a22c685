"""CKKS backends: implementations of the operation set a plan runs on (``native``: medhe's own C++ runtime)."""
