"""Supercond: a ComfyUI node pack. Loaded by ComfyUI through ``comfy_entrypoint``.

Guarded so that importing this file outside ComfyUI (pytest, tools) does nothing.
Only ``comfy_entrypoint`` and ``WEB_DIRECTORY`` are exported: exporting NODE_CLASS_MAPPINGS too
would make ComfyUI skip the V3 entry point.
"""

try:
    import folder_paths  # noqa: F401  (only importable inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./js"
