"""The shipped example: taxi ride requests, a trip-duration model, a load generator, the demo.

This package is the only code that knows the example's fields; the worker is generic.
"""
