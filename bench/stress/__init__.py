"""Reliability under hostile input, faults and concurrent load, through the real ComfyUI server:
``scripts/stress [--quick]`` prints one table (see __main__.py); tests/test_stress.py runs a miniature."""
