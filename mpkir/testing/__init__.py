"""mpkir.testing: Hypothesis strategies for .mpk modules (used by the test suites).

``from mpkir.testing.strategies import modules, runnable_modules, mutated_sources``
"""
