"""Noise-correction schedules: nodes (nodes.py) and their MODEL wrappers (hook.py)."""
