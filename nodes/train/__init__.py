"""The in-graph trainers: LoRA (lora.py), single-pass head (head.py), their ComfyUI glue (model.py, run.py) and
the dataset node (dataset.py)."""
