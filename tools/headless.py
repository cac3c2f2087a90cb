"""ComfyUI without its server, for scripts/train: imported as its main.py imports it (folders from
ComfyUI's own command-line options), with its built-in nodes and this pack only (no other custom node
and no start-up script runs), executing part of a prompt with ComfyUI's own validation and executor."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import uuid
from pathlib import Path

from .paths import PACK_DIR, find_comfyui

log = logging.getLogger("supercond")


class HeadlessError(RuntimeError):
    """The workflow cannot be run here: the message says why and what to do."""


def start(comfy_args: list[str], cpu: bool) -> Path:
    """Import ComfyUI with ``comfy_args`` (e.g. ``--extra-model-paths-config F --output-directory D``) and load
    its nodes and this pack. ``cpu``: no GPU (set before comfy.model_management picks a device)."""
    root = find_comfyui()
    if root is None:
        raise HeadlessError("ComfyUI was not found: set COMFYUI_PATH to its folder (the one with main.py)")
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, ["main.py", *comfy_args]
    try:
        import comfy.cli_args
    except SystemExit as e:  # argparse already printed what was wrong
        raise HeadlessError(f"ComfyUI did not accept the options after '--': {' '.join(comfy_args)}") from e
    finally:
        sys.argv = argv
    args = comfy.cli_args.args
    args.cpu = args.cpu or cpu
    # main.py imports these first; without it comfy/utils.py shadows the utils package.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401
    import utils.json_util  # noqa: F401

    _apply_paths(root, args)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
        raise HeadlessError(f"the Supercond pack at {PACK_DIR} failed to import (see the log above)")
    return root


def _apply_paths(root: Path, args) -> None:
    """The folders main.py sets from its options (its apply_custom_paths), in the same order."""
    import folder_paths
    import utils.extra_config

    default = root / "extra_model_paths.yaml"
    configs = [str(default)] if default.is_file() else []
    for path in configs + list(itertools.chain(*(args.extra_model_paths_config or []))):
        utils.extra_config.load_extra_path_config(path)
    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    out = folder_paths.get_output_directory()
    for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(name, os.path.join(out, name))
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))
    if args.temp_directory:
        folder_paths.set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))
    if args.user_directory:
        folder_paths.set_user_directory(os.path.abspath(args.user_directory))


def use_folders(saved: dict) -> None:
    """A server's folders as its folder_paths held them (nodes/train/ranks.py's folder_map): the ranks that
    a trainer node starts read and write exactly where the server does."""
    import folder_paths

    for name, (paths, extensions) in saved["folders"].items():
        folder_paths.folder_names_and_paths[name] = (list(paths), set(extensions))
    folder_paths.set_output_directory(saved["output"])
    folder_paths.set_input_directory(saved["input"])
    folder_paths.set_temp_directory(saved["temp"])
    folder_paths.set_user_directory(saved["user"])


def node_info(class_type: str) -> dict:
    """What the server's /object_info says of one node (the part a workflow's conversion reads)."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": cls.RETURN_TYPES,
            "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
            "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), "name": class_type,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type), "output_node": getattr(cls, "OUTPUT_NODE", False) is True}


def as_prompt(workflow: dict) -> dict:
    """An API-format prompt as it is; a UI-format workflow (``nodes`` and ``links``) converted as the
    editor converts it when queueing (comfy-cli's port of its graphToPrompt)."""
    if "nodes" not in workflow:
        return workflow
    import nodes

    try:
        from comfy_cli.workflow_to_api import convert_ui_to_api
    except ImportError:
        raise HeadlessError("a workflow saved from the editor needs comfy-cli to be read here (pip install "
                            "comfy-cli), or save it in API format (Workflow > Export (API))") from None
    types = {n.get("type") for n in workflow["nodes"]}
    missing = sorted(t for t in types if t and t not in nodes.NODE_CLASS_MAPPINGS and t not in _UI_ONLY)
    if missing:
        raise HeadlessError(f"the workflow uses node types that are neither ComfyUI's nor Supercond's: "
                            f"{', '.join(missing)}; scripts/train loads no other custom nodes")
    info = {t: node_info(t) for t in types if t in nodes.NODE_CLASS_MAPPINGS}
    return convert_ui_to_api(workflow, info)


_UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


class _Reports:
    """What ComfyUI's executor reports to its server; here only the error is kept (the log has the rest)."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event: str, data: dict, sid: str | None = None) -> None:
        pass

    def queue_updated(self) -> None:
        pass


def validate(prompt: dict, node: str) -> None:
    """ComfyUI's own queue-time checks of ``node`` and everything it depends on."""
    import execution

    validated: dict = {}
    ok = asyncio.run(execution.validate_inputs(uuid.uuid4().hex, prompt, node, validated))[0]
    if ok is not True:
        wrong = [(n, reasons) for n, (good, reasons, _) in validated.items() if good is not True and reasons]
        raise HeadlessError("the workflow does not validate: " + "; ".join(
            f"node {n} ({prompt[n]['class_type']}): " + ", ".join(
                f"{r.get('message', '')}: {r.get('details', '')}".strip(": ") for r in reasons)
            for n, reasons in wrong))


def _executor(execution, reports):
    """ComfyUI's PromptExecutor with its classic cache. Newer ComfyUI takes the cache settings as a dict and
    reads its RAM headroom (GiB) on every run (docs/compat.md); 0.3.64 takes none of it."""
    import inspect

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(reports, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    return execution.PromptExecutor(reports)


def execute(prompt: dict, node: str) -> None:
    """Run ``node`` and the nodes it depends on (nothing downstream), as the server would."""
    import execution

    executor = _executor(execution, _Reports())
    executor.execute(prompt, uuid.uuid4().hex, {}, [node])
    if not executor.success:
        error = next((d for e, d in executor.status_messages if e == "execution_error"), None)
        if error is not None:
            raise HeadlessError(f"{error['node_type']} (node {error['node_id']}) failed: "
                                f"{error['exception_message'].strip()}")
        raise HeadlessError("the run was interrupted")
