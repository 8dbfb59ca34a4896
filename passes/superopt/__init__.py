"""passes.superopt"""
