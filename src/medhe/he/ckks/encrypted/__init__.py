"""Encrypted-weight CKKS models (P3, Ran & Li): the compute server holds the model only as ciphertexts.

The key holder (the hospital) compiles the model as usual, generates one SEAL key set (``keys.create_keydir``),
encrypts every plaintext the plan would encode (``model.write_encrypted_model``) and hands the compute server the
resulting ENCDIR; the server (``model.load_encrypted_model``) runs the same instruction stream with ciphertext x
ciphertext products (``runtime``'s weight operands), and only the key holder (``client.KeyHolderClient``) can
encrypt inputs for it and decrypt its results. ``spec`` holds the compiler accounting (key levels, bytes).
"""
