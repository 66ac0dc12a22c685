"""The clients of a soak: well-behaved SDK clients whose every answer is checked, and the ones a server must survive.

- ``Subject``: one served model under test, with one client key set made once (TFHE keygen takes seconds; every
  soak client of that scheme reuses it, registering it as its own key set), real test images and what the
  plaintext model says for each (CKKS, Paillier: the plaintext model's label; TFHE, whose package exports the
  model's ``integer_model``: the integer program's accumulators, which its exact circuit reproduces bit for bit).
- ``normal_client``: an SDK ``Client`` diagnosing those images in a loop, every decrypted answer compared with the
  plaintext one; now and then it deletes its keys and registers them again (key memory churns).
- ``abandon_client``: starts key uploads and inference uploads and hangs up mid-body.
- ``slow_client``: bodies sent in small pieces with pauses within the server's body timeout (must be answered,
  and right), stalled or trickled past it (must get ``408 body_timeout``), and request heads never finished
  (``408 header_timeout``).

Each records what happened in a ``Tally``: requests by kind and outcome.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import httpx
import numpy as np

from medhe.errors import MedheError
from medhe.service import protocol
from medhe.service.client import Client
from medhe.service.errors import ServiceError
from medhe.service.rawhttp import RawRequest, head

#: Outcomes of a request that had to be answered, and was not: the soak's "lost" requests.
LOST = "lost"
#: A refusal the client is told to retry (503 busy / shutting down): not lost, but counted.
RETRYABLE = "refused_retryable"
#: An answer other than the one the server must give (e.g. 200 to a stalled body), or a client-side error.
UNEXPECTED = "unexpected"


class Tally:
    """Requests by kind and outcome, thread-safe; a few example messages per failing outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.max_logit_error: dict[str, float] = defaultdict(float)

    def add(self, kind: str, outcome: str, note: str | None = None) -> None:
        with self._lock:
            self.counts[kind][outcome] += 1
            key = f"{kind}:{outcome}"
            if note and len(self.examples[key]) < 5:
                self.examples[key].append(note[:300])

    def logit_error(self, scheme: str, err: float) -> None:
        with self._lock:
            self.max_logit_error[scheme] = max(self.max_logit_error[scheme], float(err))

    def total(self, outcome: str, kinds: tuple[str, ...] | None = None) -> int:
        with self._lock:
            return sum(c[outcome] for k, c in self.counts.items() if kinds is None or k in kinds)

    def report(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {k: dict(sorted(c.items())) for k, c in sorted(self.counts.items())}


class _Serialized:
    """One client key set shared by several threads: its encrypt/decrypt/serialize calls one at a time."""

    def __init__(self, he: Any) -> None:
        self._he, self._lock = he, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._he, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class Subject:
    """A served model, one key set for it (generated here, once), usable test images and their plaintext answers."""

    def __init__(self, scheme: str, model: str, url: str, token: str | None, data_dir: str | None,
                 n_images: int = 16):
        from medhe.data import load_dataset
        from medhe.he.scheme import scheme_package
        from medhe.models.artifact import load_artifact
        from medhe.models.predict import model_inputs, predict_logits
        from medhe.service.catalog import parse_model_arg

        self.scheme, self.url, self.token = scheme, url, token
        self.client = Client(url, token=token)  # the setup client: keeps the listing and the key set
        info = self.client.model_info(model)
        self.id = info["id"]
        self.info = info
        self.session = self.client.session(self.id)  # keygen once; this registration serves the raw clients
        self.session.he = _Serialized(self.session.he)
        self.raw_lock = threading.Lock()
        artifact = load_artifact(parse_model_arg(model)[0])
        ds = artifact.card.get("dataset") or {}
        images = load_dataset(ds.get("name") or ds.get("path"), split="test", size=ds.get("size"),
                              data_dir=data_dir).images[: 4 * n_images]
        usable = [i for i, img in enumerate(images) if not self.client.input_checks(img, self.id)]
        self.skipped_unusual = len(images[: 4 * n_images]) - len(usable)
        self.images = images[usable][:n_images]
        if not len(self.images):
            raise MedheError(f"no usable test image for {self.id!r} (all flagged unusual)")
        package = scheme_package(scheme)
        self.exact = hasattr(package, "integer_model")  # an integer circuit (TFHE): its accumulators, bit for bit
        if self.exact:
            he = self.session.he
            q = np.stack([he._he.quantize(self.session.inputs(img)) for img in self.images])
            self.expected = package.integer_model(artifact).run(q).astype(np.float64) * he.output_scale
        else:
            self.expected = predict_logits(artifact.model, model_inputs(artifact, self.images))
        self.labels = self.expected.argmax(axis=1)

    def check(self, i: int, logits: Any, tally: Tally) -> bool:
        """Is this decrypted answer for image ``i`` the plaintext one (TFHE: bit for bit; else the same label)?"""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if logits.shape != self.expected[i].shape:
            return False
        if self.exact:
            return bool(np.array_equal(logits, self.expected[i]))
        tally.logit_error(self.scheme, float(np.max(np.abs(logits - self.expected[i]))))
        return int(logits.argmax()) == int(self.labels[i])

    def new_client(self) -> Client:
        """A client of its own (own connection, own key registration) that reuses this subject's key set."""
        client = Client(self.url, token=self.token)
        client._models = self.client.models()
        sess = copy.copy(self.session)
        sess.key_id = sess.key_secret = None
        client._sessions[self.id] = sess
        return client

    def raw_keys(self) -> tuple[str, str]:
        """(key id, secret) of the shared registration the raw clients use, registered again if it was lost."""
        with self.raw_lock:
            return self.session.key_id or "", self.session.key_secret or ""

    def reregister(self) -> None:
        with self.raw_lock:
            self.client._register(self.session)

    def close(self) -> None:
        try:
            self.client.forget_keys()
        except MedheError:
            pass
        self.client.close()


def _fail(exc: Exception) -> str:
    if isinstance(exc, ServiceError) and exc.status == 503:
        return RETRYABLE
    return LOST


def normal_client(subject: Subject, stop: threading.Event, tally: Tally, offset: int = 0,
                  churn_every: int = 10) -> None:
    """Diagnose ``subject``'s images in turn until ``stop``; every ``churn_every`` answers, delete the keys (the next
    diagnosis registers them again)."""
    kind = f"{subject.scheme}_sdk"
    client = subject.new_client()
    n = 0
    try:
        while not stop.is_set():
            i = (offset + n) % len(subject.images)
            n += 1
            try:
                result = client.diagnose(subject.images[i], model=subject.id, source=f"test image {i}")
            except (ServiceError, MedheError) as exc:
                tally.add(kind, _fail(exc), f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # anything else is a bug somewhere: counted, and the client goes on
                tally.add(kind, UNEXPECTED, f"{type(exc).__name__}: {exc}")
                continue
            right = subject.check(i, result.logits, tally)
            tally.add(kind, "right" if right else "wrong", None if right else f"image {i}: {result.logits}")
            if churn_every and n % churn_every == 0:
                try:
                    client.forget_keys()
                    tally.add("key_delete", "right")
                except (ServiceError, MedheError) as exc:
                    tally.add("key_delete", _fail(exc), str(exc))
    finally:
        try:
            client.forget_keys()
        except MedheError:
            pass
        client.close()


def _endpoint(subject: Subject, what: str) -> str:
    return subject.info["endpoints"][what]


def _infer_head(subject: Subject, length: int, token: str | None) -> bytes:
    key_id, secret = subject.raw_keys()
    return head("POST", _endpoint(subject, "infer"), length, token,
                {protocol.KEY_HEADER: key_id, protocol.KEY_SECRET_HEADER: secret})


def _ciphertext(subject: Subject, i: int) -> bytes:
    sess = subject.session
    return sess.he.encrypt(sess.inputs(subject.images[i]))


def abandon_client(subjects: list[Subject], stop: threading.Event, tally: Tally, pause: float = 0.5) -> None:
    """Start uploads (evaluation keys, which the server spools to disk, and inputs, which it holds in memory) of every
    scheme and hang up after a share of the body: none of it may stay behind."""
    keys = {s.id: s.session.evaluation_keys() for s in subjects}
    shares = (0.0, 0.1, 0.5, 0.9, 0.999)
    n = 0
    while not stop.is_set():
        subject = subjects[n % len(subjects)]
        what = ("keys", "infer")[(n // len(subjects)) % 2]
        share = shares[(n // (2 * len(subjects))) % len(shares)]
        n += 1
        try:
            body = keys[subject.id] if what == "keys" else _ciphertext(subject, n % len(subject.images))
            top = (head("POST", _endpoint(subject, "keys"), len(body), subject.token) if what == "keys"
                   else _infer_head(subject, len(body), subject.token))
        except Exception as exc:
            tally.add(f"abandon_{what}", UNEXPECTED, f"{type(exc).__name__}: {exc}")
            continue
        try:
            with RawRequest(subject.url) as r:
                r.send(top)
                r.send(body[: int(len(body) * share)])
                time.sleep(0.05)
        except OSError as exc:
            tally.add(f"abandon_{what}", "connect_failed", str(exc))
            continue
        tally.add(f"abandon_{what}", "abandoned")
        stop.wait(pause)


def slow_client(subjects: list[Subject], stop: threading.Event, tally: Tally, header_timeout: float,
                body_timeout: float, offset: int = 0) -> None:
    """Bodies sent in pieces with pauses, within the server's read timeouts and beyond them, in turn."""
    modes = ("slow_infer", "stall_infer", "slow_keys", "stall_keys", "trickle_infer", "slow_head")
    n = offset
    while not stop.is_set():
        mode = modes[n % len(modes)]  # every mode soon, and over len(modes) x len(subjects) requests every pair
        subject = subjects[(n + n // len(modes)) % len(subjects)]
        n += 1
        if mode == "slow_keys" and subject.scheme == "tfhe":
            mode = "stall_keys"  # a slowly registered TFHE set would hold ~0.5 GiB more for seconds: kept to CKKS
        try:
            _slow_once(subject, mode, tally, header_timeout, body_timeout, n)
        except (OSError, httpx.HTTPError) as exc:
            tally.add(mode, LOST, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            tally.add(mode, UNEXPECTED, f"{type(exc).__name__}: {exc}")


def _within(size: int, body_timeout: float, parts: int) -> float:
    """The pause between ``parts`` pieces that keeps a body of ``size`` bytes inside the server's deadline:
    each stall under half the body timeout, all of them under 60 % of ``body_timeout + size / MIN_BODY_RATE``."""
    budget = 0.6 * (body_timeout + size / protocol.MIN_BODY_RATE)
    return min(0.5 * body_timeout, budget / max(1, parts - 1))


def _slow_once(subject: Subject, mode: str, tally: Tally, header_timeout: float, body_timeout: float,
               n: int) -> None:
    token = subject.token
    kind = f"{mode}"
    if mode == "slow_head":
        with RawRequest(subject.url, timeout=header_timeout + 30) as r:
            r.send(f"GET {protocol.PREFIX}/models HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            reply = r.reply(header_timeout + 20)
        _expect(tally, kind, reply, 408, "header_timeout")
        return
    if mode.endswith("_keys"):
        body = subject.session.evaluation_keys()
        top = head("POST", _endpoint(subject, "keys"), len(body), token)
    else:
        i = n % len(subject.images)
        body = _ciphertext(subject, i)
        top = _infer_head(subject, len(body), token)
    parts = 6
    with RawRequest(subject.url, timeout=body_timeout + 60) as r:
        r.send(top)
        if mode.startswith("stall"):
            r.send(body[: len(body) // 3])
            reply = r.reply(body_timeout + 20)  # the server answers 408 after body_timeout s of silence
            _expect(tally, kind, reply, 408, "body_timeout")
            return
        if mode == "trickle_infer":
            # pieces closer together than the stall limit, but far below MIN_BODY_RATE on average
            step, pause = 64, body_timeout / 3
            deadline = time.monotonic() + body_timeout + len(body) / protocol.MIN_BODY_RATE + 20
            reply = None
            for k in range(0, len(body), step):
                if not r.send(body[k:k + step]) or time.monotonic() > deadline:
                    break
                reply = r.reply(pause)
                if reply.status:
                    break
            if reply is None or not reply.status:
                reply = r.reply(20)
            _expect(tally, kind, reply, 408, "body_timeout")
            return
        r.send_paced(body, parts, _within(len(body), body_timeout, parts))
        reply = r.reply(600)
    if mode == "slow_keys":
        if reply.status != 201:
            tally.add(kind, _status_outcome(reply), f"status {reply.status}: {reply.body[:200]!r}")
            return
        answer = json.loads(reply.body)
        r2 = httpx.delete(subject.url + protocol.key_path(answer["key_id"]), timeout=60,
                          headers={protocol.KEY_SECRET_HEADER: answer["key_secret"],
                                   **({"Authorization": f"Bearer {token}"} if token else {})})
        deleted = r2.status_code == 204
        tally.add(kind, "right" if deleted else LOST, None if deleted else f"delete answered {r2.status_code}")
        return
    if reply.status == 404 and reply.code == "unknown_key":
        subject.reregister()
        tally.add(kind, "keys_reregistered")
        return
    if reply.status != 200:
        tally.add(kind, _status_outcome(reply), f"status {reply.status}: {reply.body[:200]!r}")
        return
    try:
        logits = subject.session.he.decrypt(reply.body)
    except MedheError as exc:
        tally.add(kind, "wrong", f"does not decrypt: {exc}")
        return
    right = subject.check(i, logits, tally)
    tally.add(kind, "right" if right else "wrong", None if right else f"image {i}: {logits}")


def _status_outcome(reply) -> str:
    return RETRYABLE if reply.status == 503 else LOST


def _expect(tally: Tally, kind: str, reply, status: int, code: str) -> None:
    if reply.status == status and reply.code == code:
        tally.add(kind, f"{status}_{code}")
    elif reply.status == 503:
        tally.add(kind, RETRYABLE, f"503 {reply.code}")
    else:
        tally.add(kind, UNEXPECTED, f"status {reply.status} {reply.code}, closed early {reply.closed_early}")
