"""Serving bundles. ``load_bundle`` needs only numpy, safetensors and one backend (torch or
onnxruntime); the exporter (``foundation.export.exporter``) needs the training stack."""

from foundation.export.bundle import (
    BundleError,
    CandidateScorer,
    History,
    Predictor,
    SearchPredictor,
    load_bundle,
)

__all__ = ["BundleError", "CandidateScorer", "History", "Predictor", "SearchPredictor", "load_bundle"]
