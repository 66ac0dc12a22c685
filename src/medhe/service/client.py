"""The hospital-side SDK: preprocess, encrypt, upload, decrypt — the secret key never leaves this process.

``Client(url).diagnose(path)`` fetches the model's public description, runs the recorded preprocessing and the
public client stage (if any) locally, generates keys once per model (the evaluation keys are registered with the
server, the secret key stays in memory here), encrypts, sends the ciphertext and decrypts the encrypted logits.
Decrypted results are never sent anywhere.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import httpx
import numpy as np

from medhe.errors import ArtifactError, DataError, MedheError, OutOfRangeError
from medhe.service import protocol
from medhe.service.errors import ServiceError


@dataclass
class Diagnosis:
    """One decrypted result: the top label, every label's probability and the raw logits."""

    model: str
    task: str
    label: str | None  # None only when abstain was asked and the prediction set is not one label
    probabilities: dict[str, float]
    logits: list[float]
    positive: list[str] = field(default_factory=list)  # multi-label: labels at probability >= 0.5
    source: str | None = None
    # Only for models whose card has a calibration record (medhe calibrate), computed here from the decrypted
    # logits: temperature-scaled probabilities and the conformal prediction set at ``coverage``.
    calibrated: dict[str, float] | None = None
    prediction_set: list[str] | dict[str, list[str]] | None = None  # multi-label: per label "negative"/"positive"
    set_text: str | None = None  # "pneumonia", "uncertain: both", "uncertain: neither label reaches ..."
    coverage: float | None = None
    abstained: bool = False  # abstain asked and the set is not one label: label is None, positive []
    model_version: str | None = None  # the card's version from the listing (model cards v2), so a result names it
    # Why the image looks unlike the model's training data (medhe.data.guard); non-empty only when it was diagnosed
    # anyway (allow_unusual=True), and then the result is unreliable.
    warnings: list[str] = field(default_factory=list)

    @property
    def unreliable(self) -> bool:
        """True when the image was diagnosed although unusual: its label is not to be trusted."""
        return bool(self.warnings)

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, "model": self.model, "model_version": self.model_version or "unknown",
               "task": self.task, "label": self.label,
               "positive": self.positive, "probabilities": self.probabilities, "logits": self.logits,
               "warnings": self.warnings, "unreliable": self.unreliable}
        if self.calibrated is not None:
            out.update({"calibrated_probabilities": self.calibrated, "prediction_set": self.prediction_set,
                        "prediction_set_text": self.set_text, "coverage": self.coverage,
                        "abstained": self.abstained})
        return out


def interpret(task: str, labels: Sequence[str], logits: np.ndarray, model: str, source: str | None = None,
              calibration: dict[str, Any] | None = None, coverage: float | None = None, abstain: bool = False,
              version: str | None = None) -> Diagnosis:
    """Decrypted logits -> probabilities and labels with the same conventions as training and evaluation.

    ``calibration``: the model's calibration record (its listing's ``calibration``); adds the calibrated
    probabilities and the prediction set at ``coverage`` (default the record's). ``abstain``: no label unless the set
    is a single label (multi-label: every label's set is). Both need a record; without one nothing changes.
    ``version``: the model's card version (its listing's ``version``), recorded in the result."""
    from medhe.models.metrics import predictions, probabilities

    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if len(logits) != len(labels):
        raise MedheError(f"model {model!r} returned {len(logits)} outputs for {len(labels)} labels; "
                         "the server's model and its card disagree")
    prob = probabilities(task, logits[None])[0]
    pred = predictions(task, logits[None])[0]
    if task == "multi-label":
        positive = [labels[i] for i in np.flatnonzero(pred)]
        top = labels[int(prob.argmax())]
    else:
        positive = []
        top = labels[int(pred)]
    result = Diagnosis(model=model, task=task, label=top, positive=positive, source=source,
                       probabilities={name: float(p) for name, p in zip(labels, prob)},
                       logits=[float(v) for v in logits], model_version=version)
    if calibration is None:
        if abstain or coverage is not None:
            raise _no_calibration(model, abstain)
        return result
    return _calibrate(result, list(labels), logits, calibration, coverage, abstain)


def _no_calibration(model: str, abstain: bool) -> MedheError:
    """The one error for asking an uncalibrated model for prediction sets (CLI option and SDK argument named)."""
    return MedheError(f"model {model!r} has no calibration record, so there is no prediction set for "
                      f"{'--abstain' if abstain else '--coverage'} (SDK: abstain=/coverage=) to use; its owner can "
                      "fit one with medhe calibrate MODEL_DIR (or drop the option)")


def calibration_for(info: dict[str, Any], coverage: float | None = None, abstain: bool = False
                    ) -> dict[str, Any] | None:
    """The checked calibration record of a listed model, or None when it has none and neither ``coverage`` nor
    ``abstain`` asks for prediction sets (then: a one-line error, before anything is encrypted or sent)."""
    from medhe.models import calibration as cal

    record = info.get("calibration")
    if record is None:
        if abstain or coverage is not None:
            raise _no_calibration(info["id"], abstain)
        return None
    if coverage is not None:
        cal.check_coverage(coverage)
    return cal.check_record(record, info["task"], len(info["labels"]), where=f"the listing of model {info['id']!r}")


def _calibrate(result: Diagnosis, labels: list[str], logits: np.ndarray, record: dict[str, Any],
               coverage: float | None, abstain: bool) -> Diagnosis:
    """Fill the calibrated fields of ``result`` (medhe.models.calibration; the record comes from the listing)."""
    from medhe.models import calibration as cal

    task = result.task
    cal.check_record(record, task, len(labels), where=f"the listing of model {result.model!r}")
    coverage = float(record["conformal"].get("default_coverage", cal.DEFAULT_COVERAGE)
                     if coverage is None else cal.check_coverage(coverage))
    probs = cal.calibrated_probabilities(record, task, logits[None])[0]
    pset = cal.prediction_sets(record, task, logits[None], coverage)[0]
    result.calibrated = {name: float(p) for name, p in zip(labels, probs)}
    result.coverage = coverage
    result.set_text = cal.describe_set(task, labels, pset)
    if task == "multi-label":
        names = ("negative", "positive")
        result.prediction_set = {name: [names[c] for c in s] for name, s in zip(labels, pset)}
    else:
        result.prediction_set = [labels[k] for k in pset]
    if abstain and not cal.is_decided(task, pset):
        result.abstained = True
        result.label, result.positive = None, []
    return result


class _ModelSession:
    """Per-model client state: description, preprocessing, client stage, the HE session and its key id."""

    def __init__(self, info: dict[str, Any], stage_weights: bytes | None, keys: Any = None):
        from medhe.data import Preprocess

        self.info = info
        self.id = info["id"]
        self.preprocess = Preprocess.from_dict(info["preprocessing"])
        self.stage = _build_stage(info, stage_weights) if stage_weights is not None else None
        self.he = _he_session(info, keys)
        self.he.keygen()
        self.key_id: str | None = None
        self.key_secret: str | None = None  # proves to the server that these keys are ours (never logged)
        self.key_bytes = 0  # size of the registered evaluation keys

    def key_headers(self) -> dict[str, str]:
        """The headers that name (key id) and unlock (key secret) this session's registered keys."""
        headers = {protocol.KEY_HEADER: self.key_id or ""}
        if self.key_secret:
            headers[protocol.KEY_SECRET_HEADER] = self.key_secret
        return headers

    def evaluation_keys(self) -> bytes:
        """Serialized on demand, not kept: they can be ~100 MB and are needed again only to re-register."""
        return self.he.evaluation_keys()

    def inputs(self, image: np.ndarray) -> np.ndarray:
        """uint8 image -> float32 input of the server network: exactly what the plaintext model would get."""
        x = self.preprocess(image)
        if self.stage is not None:
            import torch

            with torch.no_grad():
                x = self.stage(torch.from_numpy(x[None])).float().numpy()[0]
        return np.ascontiguousarray(x, dtype=np.float32)


def _he_session(info: dict[str, Any], keys: Any) -> Any:
    """A fresh key pair per session, or, for an encrypted model, the key holder's KEYDIR (its weights are
    ciphertexts under that one key set)."""
    from medhe.he.scheme import client_for, key_holder_client

    spec = info["spec"]
    if keys is None and not (isinstance(spec, dict) and spec.get("encrypted_model")):
        return client_for(spec)
    if keys is None:
        raise MedheError(f"model {info['id']!r} is an encrypted model: only the holder of the key set its weights "
                         "are encrypted under can use it; pass --keys KEYDIR (SDK: Client(url, keys=KEYDIR))")
    return key_holder_client(spec, keys, where=f"the server's model {info['id']!r}")


def _build_stage(info: dict[str, Any], weights: bytes):
    from safetensors.torch import load as load_tensors

    from medhe.models.zoo import build_model

    stage = info["client_stage"]
    if hashlib.sha256(weights).hexdigest() != stage["weights_sha256"]:
        raise ArtifactError(f"client-stage weights of {info['id']!r} do not match their announced sha256; "
                            "the download was corrupted; try again")
    model = build_model(stage["arch"], **stage.get("arch_kwargs", {}))
    try:
        model.load_state_dict(load_tensors(weights), strict=True)
    except Exception as exc:
        raise ArtifactError(f"client-stage weights of {info['id']!r} do not fit architecture {stage['arch']!r}: "
                            f"{exc}") from None
    return model.eval()


class Client:
    """SDK for a medhe server. Thread-safe for reads; give each thread its own ``Client`` for independent keys.

    ``token`` defaults to ``$MEDHE_TOKEN``; ``verify`` is passed to httpx (a CA bundle path for self-signed TLS);
    ``keys``: a KEYDIR (path or loaded) for encrypted models, whose weights are ciphertexts under that key set.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0, verify: Any = True,
                 transport: httpx.BaseTransport | None = None, keys: Any = None):
        if not str(url).startswith(("http://", "https://")):
            raise MedheError(f"server URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000)")
        token = token if token is not None else os.environ.get(protocol.TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        if self.url.endswith(protocol.PREFIX):  # the URL `medhe serve` prints ends in /v1; routes add it again
            self.url = self.url[: -len(protocol.PREFIX)]
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify,
                                  transport=transport)
        if keys is not None and not hasattr(keys, "key_id"):
            from medhe.he.scheme import encrypted_weight_scheme, scheme_hook

            keys = scheme_hook(encrypted_weight_scheme(), "load_keydir")(keys)
        self._keys = keys
        self._sessions: dict[str, _ModelSession] = {}
        self._models: list[dict[str, Any]] | None = None
        self.retries = 0  # requests sent again after re-registering keys the server had lost

    # -- plumbing --------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a ``503 busy`` (every upload slot taken) is sent again after its ``Retry-After``, up to
        ``BUSY_RETRIES`` times. Other refusals raise ``ServiceError``."""
        for attempt in range(BUSY_RETRIES + 1):
            response = self._send(method, path, **kwargs)
            if response.status_code != 503 or attempt == BUSY_RETRIES or _code(response) != "busy":
                break
            time.sleep(_retry_after(response))
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise MedheError(f"the server at {self.url} did not answer in time; it may be overloaded") from None
        except httpx.TransportError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise MedheError(f"the TLS certificate of {self.url} is not trusted ({exc}); pass the server's "
                                 "certificate or CA bundle with --cacert FILE (SDK: Client(url, verify=FILE))") from None
            raise MedheError(f"cannot reach the medhe server at {self.url} ({type(exc).__name__}: {exc}); "
                             "is `medhe serve` running there?") from None

    # -- public API ------------------------------------------------------------------------------------------------
    def _json(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            body = response.json()
            return body if key is None else body[key]
        except (ValueError, KeyError, TypeError):
            raise MedheError(f"{self.url}{path} did not answer like a medhe server (protocol "
                             f"{protocol.API_VERSION}); check the URL and that both sides run compatible medhe") from None

    def health(self) -> dict[str, Any]:
        """The server's liveness answer (medhe version, ``protocol_version``), checked to be a revision of the
        protocol this client speaks."""
        answer = self._json("GET", f"{protocol.PREFIX}/health")
        check_protocol(answer, self.url)
        return answer

    def models(self) -> list[dict[str, Any]]:
        """Public descriptions of every served model (scheme, parameters, preprocessing, labels, metrics)."""
        if self._models is None:
            listing = self._json("GET", protocol.models_path())
            check_protocol(listing, self.url)
            try:
                models = listing["models"]
                for info in models:
                    check_protocol(info, self.url)
            except (KeyError, TypeError):
                raise MedheError(f"{self.url}{protocol.models_path()} did not answer like a medhe server (protocol "
                                 f"{protocol.API_VERSION}); check the URL") from None
            self._models = models
        return self._models

    def refresh_models(self) -> None:
        """Forget the cached listing so the next ``models()`` asks the server again (after it restarted, or to
        retry after it was down). Sessions and their keys stay: a changed model is refused by the server."""
        self._models = None

    def model_info(self, model: str | None = None) -> dict[str, Any]:
        models = self.models()
        if model is None:
            if len(models) == 1:
                return models[0]
            raise MedheError(f"the server offers several models ({', '.join(m['id'] for m in models)}); "
                             "choose one with --model / model=")
        for info in models:
            if model in (info["id"], info["name"]):
                return info
        raise MedheError(f"the server has no model {model!r}; it offers {', '.join(m['id'] for m in models)}")

    def session(self, model: str | None = None) -> _ModelSession:
        """The cached per-model session (keys generated once and registered once per ``Client``)."""
        info = self.model_info(model)
        sess = self._sessions.get(info["id"])
        if sess is None:
            weights = None
            if info.get("client_stage"):
                weights = self._request("GET", info["client_stage"]["weights_url"]).content
            sess = _ModelSession(info, weights, self._keys)
            self._sessions[info["id"]] = sess
        if sess.key_id is None:
            self._register(sess)
        return sess

    def _register(self, sess: _ModelSession) -> None:
        reply = self._json("POST", sess.info["endpoints"]["keys"], content=sess.evaluation_keys(),
                           headers={"Content-Type": protocol.OCTET})
        sess.key_id, sess.key_bytes = reply["key_id"], int(reply["bytes"])
        sess.key_secret = reply.get("key_secret")  # servers before protocol v1.1 return none

    def infer_response(self, sess: _ModelSession, ciphertext: bytes) -> httpx.Response:
        """POST one ciphertext; if the server lost the keys (idle expiry, eviction, a worker that crashed or was
        restarted), register them again and retry once. ``self.retries`` counts those retries."""
        for attempt in (0, 1):
            try:
                return self._request("POST", sess.info["endpoints"]["infer"], content=ciphertext,
                                     headers={"Content-Type": protocol.OCTET, **sess.key_headers()})
            except ServiceError as exc:
                if exc.code not in ("unknown_key", "worker_crashed") or attempt:
                    raise
                self._register(sess)
                self.retries += 1
        raise AssertionError("unreachable")

    def infer_encrypted(self, sess: _ModelSession, ciphertext: bytes) -> bytes:
        """The encrypted result of one ciphertext (see ``infer_response`` for the retry)."""
        return self.infer_response(sess, ciphertext).content

    def input_checks(self, image: np.ndarray, model: str | None = None) -> list[str]:
        """Why ``image`` looks unlike ``model``'s training data (``medhe.data.guard``, the checks ``medhe predict``
        and the page run); empty when it looks usual. Needs only the public listing: no keys, nothing sent."""
        from medhe.data import Preprocess
        from medhe.data.guard import check_image

        return check_image(image, Preprocess.from_dict(self.model_info(model)["preprocessing"]))

    def diagnose(self, image: str | os.PathLike | np.ndarray, model: str | None = None,
                 source: str | None = None, coverage: float | None = None, abstain: bool = False,
                 allow_unusual: bool = False) -> Diagnosis:
        """Diagnose one image (a PNG/JPEG/DICOM path, or a uint8 array named ``source``) under encryption.

        An image unlike the model's training data (a 1x1 PNG, a colour photo, a blank frame: ``input_checks``) is
        refused with a ``DataError`` before any key is generated or anything is sent, as ``medhe predict`` and the
        page refuse it; ``allow_unusual=True`` diagnoses it anyway, its result marked (``unreliable`` True, the
        reasons in ``warnings``). Models with a calibration record also get calibrated probabilities and a
        prediction set at ``coverage`` (default the record's, 0.9), computed here from the decrypted logits;
        ``abstain=True`` withholds the label (``label`` None, ``abstained`` True) unless that set is a single
        label."""
        from medhe.data import read_image

        if not isinstance(image, np.ndarray):
            source = str(image)
            image = read_image(Path(image))
        warnings = self._admit([(image, source or "image")], model, allow_unusual)[0]
        return self._diagnose(image, model, source, coverage, abstain, warnings)

    def _admit(self, items: Sequence[tuple[np.ndarray, str]], model: str | None, allow_unusual: bool
               ) -> list[list[str]]:
        """Each image's input checks; a flagged image refuses the call (naming it and how many more) unless
        ``allow_unusual``. Runs before keys or uploads, so a refused call sends nothing."""
        from medhe.data.guard import refusal

        if not isinstance(allow_unusual, bool):
            raise MedheError(f"allow_unusual must be True or False, not {allow_unusual!r}")
        checks = [self.input_checks(img, model) for img, _ in items]
        flagged = [(name, w) for (_, name), w in zip(items, checks) if w]
        if flagged and not allow_unusual:
            (name, warnings), more = flagged[0], len(flagged) - 1
            others = f" (and {more} more image{'s' if more > 1 else ''})" if more else ""
            raise DataError(refusal(f"{name}{others}", warnings, "pass allow_unusual=True"))
        return checks

    def _diagnose(self, image: np.ndarray, model: str | None, source: str | None, coverage: float | None,
                  abstain: bool, warnings: list[str]) -> Diagnosis:
        """One checked image: keys (once), encrypt, upload, decrypt, interpret; ``warnings`` mark the result."""
        sess = self.session(model)
        record = calibration_for(sess.info, coverage, abstain)  # a missing or bad record fails before any upload
        ciphertext = sess.he.encrypt(sess.inputs(image))
        try:
            logits = sess.he.decrypt(self.infer_encrypted(sess, ciphertext))
        except OutOfRangeError as exc:
            raise OutOfRangeError(f"{source or 'image'}: {exc}") from None
        result = interpret(sess.info["task"], sess.info["labels"], logits, sess.id, source,
                           calibration=record, coverage=coverage, abstain=abstain, version=sess.info.get("version"))
        result.warnings = list(warnings)
        return result

    def diagnose_many(self, images: Iterable[str | os.PathLike | np.ndarray], model: str | None = None,
                      progress: bool = True, coverage: float | None = None, abstain: bool = False,
                      allow_unusual: bool = False) -> list[Diagnosis]:
        """Diagnose several images in turn with one key registration, showing a progress bar (``coverage``,
        ``abstain``, ``allow_unusual``: as in ``diagnose``; one unusual image refuses the whole call, before any
        key or upload, unless ``allow_unusual``)."""
        from tqdm import tqdm

        from medhe.data import read_image

        # Read and check everything first: a bad or unusual file fails before any key generation or upload.
        items = [(img, None) if isinstance(img, np.ndarray) else (read_image(Path(img)), str(img)) for img in images]
        checks = self._admit([(img, source or f"image {i + 1}") for i, (img, source) in enumerate(items)], model,
                             allow_unusual)
        calibration_for(self.session(model).info, coverage, abstain)  # keys first: the bar measures diagnoses
        results = []
        for i, (img, source) in enumerate(tqdm(items, desc="encrypted diagnosis", unit="img", disable=not progress)):
            result = self._diagnose(img, model, source or f"image {i + 1}", coverage, abstain,  # errors name it
                                    checks[i])
            result.source = source
            results.append(result)
        return results

    def forget_keys(self) -> None:
        """Ask the server to drop this client's registered keys (they would also expire on their own)."""
        for sess in self._sessions.values():
            if sess.key_id is not None:
                try:
                    self._request("DELETE", protocol.key_path(sess.key_id), headers=sess.key_headers())
                except ServiceError as exc:
                    if exc.status != 404:
                        raise
                sess.key_id = sess.key_secret = None


BUSY_RETRIES = 3  # a 503 busy is retried this often (after its Retry-After, at most MAX_RETRY_AFTER s each)
MAX_RETRY_AFTER = 10.0


def check_protocol(announced: Any, url: str) -> None:
    """Refuse, in one line, a server that announces a revision of protocol v1 this client does not speak. A
    server that announces none predates the field (medhe before issue 32) and speaks revision 2 or older."""
    version = announced.get("protocol_version") if isinstance(announced, dict) else None
    if version is None or version in protocol.SUPPORTED_PROTOCOL_VERSIONS:
        return
    speaks = ", ".join(str(v) for v in protocol.SUPPORTED_PROTOCOL_VERSIONS)
    what = f"model {announced['id']!r} on " if "id" in announced else ""
    raise MedheError(f"{what}the server at {url} speaks medhe protocol {protocol.API_VERSION} revision {version}, "
                     f"this client revision {speaks}: install the medhe version the server's operator names "
                     "(GET /v1/health shows its version)")


def _code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except Exception:
        return None


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _error_from(response: httpx.Response) -> ServiceError:
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except Exception:
        code, message = "http_error", response.text[:200] or response.reason_phrase
    return ServiceError(response.status_code, code, f"server refused the request ({response.status_code} {code}): "
                                                    f"{message}")
