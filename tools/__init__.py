"""Developer tools: find ComfyUI, generate fixtures, run a server, convert workflows."""
