"""What the page says about a served model, from its public description: the facts a clinician needs to pick one
and to know what the remote server can and cannot learn."""

from __future__ import annotations

from typing import Any

#: how each task turns probabilities into a finding (the same rule as ``medhe.models.metrics.predictions``).
DECISION = {
    "binary-class": "the class whose probability is at least 0.5",
    "multi-class": "the class with the highest probability",
    "ordinal-regression": "the grade with the highest probability",
    "multi-label": "every label whose probability is at least 0.5",
}
THRESHOLD = 0.5


def scheme_text(spec: dict[str, Any], scheme: str) -> str:
    params = spec.get("params") or {}
    if scheme == "ckks" and "poly_degree" in params:
        primes = params.get("prime_bits") or []
        return (f"CKKS (SEAL), ring degree {params['poly_degree']}, {len(primes)} primes "
                f"({sum(primes)}-bit modulus), 128-bit security")
    if scheme == "paillier" and "key_bits" in params:
        return f"Paillier ({params.get('library', 'phe')}), {params['key_bits']}-bit keys"
    if scheme == "tfhe":
        return "TFHE (Concrete), 128-bit security"
    return scheme.upper()


def server_learns(info: dict[str, Any]) -> str:
    stage = " Your computer first runs the model's public feature extractor." if info.get("client_stage") else ""
    return ("The server learns which model you use, when, and the sizes of the encrypted data; it never sees the "
            "scan, the secret key or the diagnosis." + stage)


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """The page's model card: everything it shows, JSON-able."""
    test = (info.get("metrics") or {}).get("test") or {}
    pre = info.get("preprocessing") or {}
    return {
        "id": info["id"],
        "name": info.get("name", info["id"]),
        "scheme": info["scheme"],
        "scheme_text": scheme_text(info.get("spec") or {}, info["scheme"]),
        "task": info["task"],
        "labels": list(info["labels"]),
        "input": f"{pre.get('size', '?')}x{pre.get('size', '?')} "
                 f"{'greyscale' if pre.get('channels', 1) == 1 else 'colour'}",
        "test_metrics": {k: round(float(v), 3) for k, v in test.items() if isinstance(v, (int, float))},
        "dataset": (info.get("dataset") or {}).get("name") if isinstance(info.get("dataset"), dict)
        else info.get("dataset"),
        "server_learns": server_learns(info),
        "decision": DECISION.get(info["task"], "the class with the highest probability"),
        "threshold": THRESHOLD,
        # calibrated models only: the page then offers a coverage field and shows prediction sets
        **({"calibration": {"default_coverage": (info["calibration"].get("conformal") or {}).get(
            "default_coverage", 0.9), "fitted_on": info["calibration"].get("fitted_on"),
            "n": info["calibration"].get("n")}} if isinstance(info.get("calibration"), dict) else {}),
    }
