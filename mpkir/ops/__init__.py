"""Operator registry."""
