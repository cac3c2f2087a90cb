"""Tiny random-weight models, built with ComfyUI's own classes, that its real loaders read.

One module per family (``sd``: SD1.x and SD3, ``sdxl``, ``flux``: Flux and Chroma, ``qwen_image``,
``wan``), ``common`` for what they share (seeded init, fp16 save, cache stamps), ``registry`` for
which files exist and how each family is loaded and checked, ``standins`` for the tiny text
encoders of families whose real ones are too large to build here, ``check`` for ``--check``.

Imports only relatively and never from the pack (``nodes/``, ``core/``): it runs in a subprocess
before the pack is set up, as ``fixture_models`` (tools/fixtures.py), ``supercond.tools.fixture_models``
(tests) or under the test stand-in pack's own name. Nothing here imports torch or ComfyUI at
module level except ``standins`` and the builders' function bodies.
"""
