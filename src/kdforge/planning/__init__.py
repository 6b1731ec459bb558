"""`kdforge plan`'s arithmetic: what a teacher and a student need per device at every stage, before any hardware.

Pure functions on architecture facts (a ``config.json`` or a known name; no weights, no torch):
``architecture`` (the facts and the parameter counts), ``memory`` (the byte formulas, one per
component), ``plans`` (every stage x strategy x precision on the given devices, what fits, the
recommended plan) and ``report`` (the table and the JSON). docs/distributed.md states the formulas.
"""
