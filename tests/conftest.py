"""Hypothesis settings profiles, chosen by SURGERY_HYPOTHESIS_PROFILE (default: dev).

- dev: quick local runs.
- ci: what CI runs: at least 2,000 examples per rewrite for the function form.
- thorough: ten times ci, for a night.

The graph form (export, rewrite, run) costs about a second an example, so its tests run
GRAPH_FRACTION of the profile's examples (never fewer than 25).
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("dev", max_examples=200, **_common)
settings.register_profile("ci", max_examples=2000, derandomize=False, **_common)
settings.register_profile("thorough", max_examples=20000, **_common)
PROFILE = os.environ.get("SURGERY_HYPOTHESIS_PROFILE", "dev")
if PROFILE not in ("dev", "ci", "thorough"):
    raise ValueError(f"SURGERY_HYPOTHESIS_PROFILE must be dev, ci or thorough, got {PROFILE!r}")
settings.load_profile(PROFILE)
