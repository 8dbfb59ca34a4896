"""mpkir.testing: Hypothesis strategies for .mpk modules (used by the test suites)."""
