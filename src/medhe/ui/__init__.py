"""``medhe ui``: the clinician's page. A local web app on the hospital's machine that holds the keys, encrypts and
decrypts here and talks to a remote ``medhe serve`` only through the SDK (``medhe.service.client``).

Layer: ``service -> ui -> cli``. It imports the SDK and ``medhe.data``; nothing below imports it.
"""
