"""CKKS bytes on the wire: ``envelope`` (the client/server message frame tying parts to a plan), ``serialize``
(SEAL objects <-> compact, checked bytes), ``bits`` (coefficient bit packing), ``seeder`` (the client's seeded
form, which halves uploads). Nothing here changes SEAL's byte format: keys, inputs and outputs stay SEAL's bytes.
"""
