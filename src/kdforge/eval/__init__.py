"""Evaluation: agreement with the teacher, the task set, stability, speed and size; reports and plots.

`kdforge.stages.eval` runs `kdforge eval` over runtimes (`kdforge.runtime`: every model, whatever
backend runs it, through one interface); kdforge/scoring.py (agreement with the teacher), tasks.py
(+ sandbox.py, generation.py), stability.py, speed.py, lmeval.py and plots.py each compute one
section; markdown.py renders report.md from report.json's dict. What every figure means:
docs/evaluation.md.
"""
