"""The wire protocol shared by the server and the SDK, in one place so the two cannot drift apart.

Everything is under a versioned prefix. Ciphertexts and keys travel as raw ``application/octet-stream`` bodies
(base64 in JSON would add a third to megabyte payloads); metadata and errors are JSON. See docs/service.md.
"""

from __future__ import annotations

API_VERSION = "v1"
#: revision of protocol v1 this server and SDK speak, announced in /v1/health, /v1/models and every model's
#: description (``protocol_version``) so a client can tell before anything fails: 1 = as first published, 2 = key
#: secrets required (issue #16). A client refuses a server of a revision it does not speak, in one line.
PROTOCOL_VERSION = 2
SUPPORTED_PROTOCOL_VERSIONS = (2,)
PREFIX = f"/{API_VERSION}"
OCTET = "application/octet-stream"
#: header naming the registered evaluation keys an inference request uses.
KEY_HEADER = "X-Medhe-Key-Id"
#: header with the key secret returned at registration: required, with the key id, to use or delete the keys.
KEY_SECRET_HEADER = "X-Medhe-Key-Secret"
#: response header with the server-side evaluation time in milliseconds (for benchmarks, not for trust).
EVAL_MS_HEADER = "X-Medhe-Eval-Ms"
TOKEN_ENV = "MEDHE_TOKEN"

MiB = 1 << 20
DEFAULT_MAX_BODY = 256 * MiB       # one encrypted input, for schemes whose spec gives no bound (TFHE)
DEFAULT_MAX_KEY_BYTES = 4096 * MiB  # memory all clients' loaded evaluation keys may hold together
DEFAULT_MAX_KEYS = 256              # key sets registered at once, all clients together
DEFAULT_MAX_KEYS_PER_CLIENT = 64    # key sets registered at once from one client address
DEFAULT_KEY_TTL = 3600.0            # seconds a key set may sit unused
# -- how long and how many (issue 32): memory and sockets bounded by design, slow clients cut off
DEFAULT_MAX_UPLOADS = 32            # requests with a body in progress at once (each holds one slot to its answer)
DEFAULT_UPLOAD_WAIT = 60.0          # seconds a request waits for an upload slot before 503 busy
DEFAULT_HEADER_TIMEOUT = 10.0       # seconds from connection (or last answer) to a complete request head
DEFAULT_BODY_TIMEOUT = 30.0         # seconds a body may stall between two chunks
MIN_BODY_RATE = 64 << 10            # bytes/s a body must average after its first DEFAULT_BODY_TIMEOUT seconds
DEFAULT_MAX_CONNECTIONS = 1024      # open connections; the next one gets 503 and is closed
DEFAULT_DRAIN_TIMEOUT = 30.0        # seconds SIGTERM waits for in-flight requests before stopping anyway
DEFAULT_MAX_BATCH_KEY_BYTES = 256 * MiB  # memory all batch key sets hold together (as loaded)


def models_path() -> str:
    return f"{PREFIX}/models"


def model_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}"


def keys_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/keys"


def infer_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/infer"


def client_stage_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/client-stage"


def key_path(key_id: str) -> str:
    return f"{PREFIX}/keys/{key_id}"


# -- batch mode (CKKS, one image per slot): see docs/service.md "Batch mode"
DEFAULT_MAX_BATCH_BODY = 512 * MiB  # one encrypted batch upload (4096 pneumoniamnist images: 145 MB)


def batch_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/batch"


def batch_keys_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/batch/keys"


def batch_key_path(model_id: str, key_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/batch/keys/{key_id}"


def batch_infer_path(model_id: str) -> str:
    return f"{PREFIX}/models/{model_id}/batch/infer"
