"""HE-friendly torch layers, the model zoo, training, metrics and self-describing model artifacts."""
