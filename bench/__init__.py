"""Benchmarks of calicnm, run as modules from the repository's root (as root):
``python -m bench.dataplane``, ``python -m bench.controlplane``, ``python -m bench.policy_bench``.

They build what they measure with :mod:`lab` and share :mod:`bench.report`.
"""
