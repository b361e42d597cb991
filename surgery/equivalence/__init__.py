"""Equivalence: hypothesis strategies, comparison metrics, graph-form checks and reports."""

from .compare import FLOAT32_MAX_ABS, FLOAT64_MAX_REL, ErrorStats, assert_equivalent, compare, ulp_distance

__all__ = ["FLOAT32_MAX_ABS", "FLOAT64_MAX_REL", "ErrorStats", "assert_equivalent", "compare", "ulp_distance"]
