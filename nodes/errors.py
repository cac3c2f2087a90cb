"""The one error type of the glue: an input (MODEL, conditioning, file, setting) that cannot be served.

Its message is what the user sees in ComfyUI's error dialog: say what was wrong and what to do.
"""

from __future__ import annotations


class InputError(ValueError):
    """This input cannot be served; the message says why and what to do instead."""
