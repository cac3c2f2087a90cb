"""Single-pass superconditioned sampling: head nodes (nodes.py) and the sampling wrappers (hook.py)."""
