"""Pure-torch algorithms of Supercond. Nothing here imports ComfyUI."""
