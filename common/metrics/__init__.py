"""Metrics as pure functions returning flat dicts with stable keys, so tables and logs line up across pipelines.

Submodules are imported by name (``from common.metrics.classification import binary_metrics``) so that a pipeline
pays only for the libraries its metrics need.
"""
