"""Conditioning perturbation: CEP and CADS nodes (nodes.py) and their sampling-time wrappers (hook.py)."""
