"""rcnnops: a reproducible retraining pipeline for the R-CNN family of detectors.

The library: stages (``prepare``, ``proposals``, ``train``, ``evaluate``), the
variants (:mod:`rcnnops.models`), the model registry service
(:mod:`rcnnops.registry`) and serving. The Prefect flows that run it live in the
``pipelines`` package, which imports this one (never the reverse).
"""
