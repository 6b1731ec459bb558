"""Evaluation: agreement with the teacher, speed, size; reports."""
