"""Widget constructors every node file uses, so ranges and tooltips are declared one way."""

from __future__ import annotations

from collections.abc import Iterable

from comfy_api.v0_0_2 import io

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def float_input(name: str, default: float, lo: float, hi: float, step: float, tip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tip)


def int_input(name: str, default: int, lo: int, hi: int, tip: str) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tip)


def register_model_folder(name: str, extensions: Iterable[str]) -> None:
    """``models/<name>`` (plus what extra_model_paths.yaml adds under that name), listing ``extensions``."""
    import os

    import folder_paths

    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    paths, _ = folder_paths.folder_names_and_paths[name]
    folder_paths.folder_names_and_paths[name] = (paths, set(extensions))
