"""Evaluation: metrics, gates and reports."""
