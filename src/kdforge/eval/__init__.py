"""Evaluation: agreement with the teacher, the task set, stability, speed and size; reports and plots.

report.py runs `kdforge eval`; kdforge/scoring.py (agreement with the teacher), tasks.py
(+ sandbox.py), stability.py, speed.py, lmeval.py and plots.py each compute one section;
markdown.py renders report.md from report.json's dict. What every figure means: docs/evaluation.md.
"""
