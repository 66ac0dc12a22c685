"""SDK side of batch mode: many images per request, one image per CKKS slot, the secret key stays here.

``BatchDiagnoser(client).diagnose(images)`` fetches the model's batch spec, generates keys once (relinearization
keys only are registered), encrypts the images in ciphertext batches (4096 images each at N=8192), posts each batch
and decrypts the encrypted logits locally.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medhe.errors import MedheError, OutOfRangeError
from medhe.service import protocol
from medhe.service.client import Client, Diagnosis, interpret
from medhe.service.errors import ServiceError


class BatchDiagnoser:
    def __init__(self, client: Client, model: str | None = None) -> None:
        from medhe.data import Preprocess
        from medhe.he.scheme import batch_client_for

        self.client = client
        self.info = client.model_info(model)
        self.id = self.info["id"]
        if self.info.get("client_stage"):
            raise MedheError(f"model {self.id!r} runs a public network on the client first; batch mode serves "
                             "models without a client stage: use medhe predict without --batch")
        self.spec = client._json("GET", protocol.batch_path(self.id))
        self.preprocess = Preprocess.from_dict(self.info["preprocessing"])
        self.he = batch_client_for(self.spec)
        self.he.keygen()
        self.key_id: str | None = None
        self.key_secret: str | None = None  # proves to the server that these batch keys are ours

    def _register(self) -> None:
        reply = self.client._json("POST", protocol.batch_keys_path(self.id), content=self.he.evaluation_keys(),
                                  headers={"Content-Type": protocol.OCTET})
        self.key_id, self.key_secret = reply["key_id"], reply["key_secret"]

    def _post(self, upload: bytes) -> bytes:
        for attempt in (0, 1):
            if self.key_id is None:
                self._register()
            try:
                return self.client._request("POST", protocol.batch_infer_path(self.id), content=upload,
                                            headers={"Content-Type": protocol.OCTET,
                                                     protocol.KEY_HEADER: str(self.key_id),
                                                     protocol.KEY_SECRET_HEADER: str(self.key_secret)}).content
            except ServiceError as exc:
                if exc.code != "unknown_key" or attempt:
                    raise
                self.key_id = self.key_secret = None
        raise AssertionError("unreachable")

    def inputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(self.preprocess(img), dtype=np.float32) for img in images])

    def diagnose(self, images: Sequence[np.ndarray], sources: Sequence[str] | None = None,
                 progress: bool = False, coverage: float | None = None, abstain: bool = False,
                 allow_unusual: bool = False) -> list[Diagnosis]:
        """Diagnoses of ``images`` (``coverage``, ``abstain``, ``allow_unusual``: as in ``Client.diagnose``: an
        image unlike the training data refuses the batch before anything is encrypted or sent, unless
        ``allow_unusual``, which marks its result unreliable)."""
        from tqdm import tqdm

        from medhe.service.client import calibration_for

        record = calibration_for(self.info, coverage, abstain)  # before anything is encrypted
        sources = list(sources) if sources is not None else [f"image {i + 1}" for i in range(len(images))]
        checks = self.client._admit(list(zip(images, sources)), self.id, allow_unusual)
        x = self.inputs(images)
        batch = self.he.batch
        logits = []
        for k, upload in enumerate(tqdm(self.he.iter_encrypt(x), total=self.he.batches(len(x)), unit="batch",
                                        desc="encrypted batch diagnosis", disable=not progress)):
            try:
                logits.append(self.he.decrypt_one(self._post(upload)))
            except OutOfRangeError as exc:
                first, last = sources[k * batch], sources[min(len(sources), (k + 1) * batch) - 1]
                raise OutOfRangeError(f"batch {first} .. {last}: {exc}") from None
        out = np.concatenate(logits)[: len(x)]
        task, labels = self.info["task"], self.info["labels"]
        results = [interpret(task, labels, out[i], self.id, sources[i], calibration=record, coverage=coverage,
                             abstain=abstain, version=self.info.get("version")) for i in range(len(x))]
        for result, warnings in zip(results, checks):
            result.warnings = list(warnings)
        return results

    def forget_keys(self) -> None:
        if self.key_id is not None:
            try:
                self.client._request("DELETE", protocol.batch_key_path(self.id, self.key_id),
                                     headers={protocol.KEY_SECRET_HEADER: str(self.key_secret)})
            except ServiceError as exc:
                if exc.status != 404:
                    raise
            self.key_id = self.key_secret = None


def batch_spec(client: Client, model: str | None = None) -> dict[str, Any]:
    return client._json("GET", protocol.batch_path(client.model_info(model)["id"]))
