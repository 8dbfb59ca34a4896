"""mpkir.passes: compiler passes over the IR and the pass manager that runs them.

``from mpkir.passes.manager import PASSES, parse_pipeline, run_passes``; passes are imported lazily.
"""
