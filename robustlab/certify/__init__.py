"""Certified robustness: verified bounds by bound propagation (``robustlab.certify.ibp``)."""
