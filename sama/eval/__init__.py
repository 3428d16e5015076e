"""Evaluation: how close edited videos are to their targets (metrics.py)."""
