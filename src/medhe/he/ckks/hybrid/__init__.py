"""Hybrid key switching (Han & Ki, CT-RSA 2020): evaluation keys over a few digits with several special primes.

SEAL's keys decompose over every data prime with one special prime, so each key grows with the square of the
chain. Here ``alpha`` data primes form a digit and ``k`` special primes (product P >= every digit's modulus)
absorb the digit noise: a key has ``dnum = ceil(L / alpha)`` digits over ``L + k`` primes. ``layout`` describes
such a chain, ``keygen`` makes the keys on the client from SEAL's own samplers, ``keys`` turns the bytes as sent
into the native runtime's keys on the server.
"""
