"""scripts/train: the SupercondTrainLoRA or SupercondTrainHead node of a saved workflow, run outside the
server on one or more processes. Several processes are started by torchrun (torch.distributed.run) with
any of its options (one machine, or several with its rendezvous); each process (a rank) imports ComfyUI
headless (tools/headless.py), runs the nodes the trainer depends on with ComfyUI's executor, and trains
data-parallel (nodes/train/distributed.py). Rank 0 writes the files and shows the progress. A trainer
node whose ``processes`` input is above 1 starts this script itself (nodes/train/ranks.py).

    scripts/train WORKFLOW.json [--processes N] [--node ID] [torchrun options] [-- ComfyUI options]

This file has no relative import at the top: torchrun runs it as a script (``--rank``)."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("supercond")
TRAINERS = ("SupercondTrainLoRA", "SupercondTrainHead")
HERE = Path(__file__).resolve().parent
IN_RANK = "SUPERCOND_TRAIN_RANK"  # nodes/train/ranks.py reads it: a trainer node here ignores ``processes``
EVENT_LINE = "@supercond-event "  # nodes/train/ranks.py reads these lines
SHARD_ENV = "SUPERCOND_SHARD_BASE"  # nodes/train/sharding.py reads it
SHARD_NEEDS_RANKS = ("--shard-base splits the base model across processes: use it with --processes 2 or more "
                     "(or torchrun's --nnodes)")


def _tools():
    """This folder as package ``supercond_tools`` (the pack's root never goes on sys.path: its ``nodes``
    would shadow ComfyUI's)."""
    if "supercond_tools" not in sys.modules:
        spec = importlib.util.spec_from_file_location("supercond_tools", HERE / "__init__.py",
                                                      submodule_search_locations=[str(HERE)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["supercond_tools"] = module
        spec.loader.exec_module(module)
    import supercond_tools.headless as headless

    return headless


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/train", description=(
        "Run the trainer node of a saved workflow (UI or API format) outside the server, on one process or "
        "several (torchrun). Options this script does not know go to torchrun (--nnodes, --node-rank, "
        "--rdzv-endpoint, ...); options after '--' go to ComfyUI (--extra-model-paths-config, "
        "--output-directory, --input-directory, ...)."))
    p.add_argument("workflow", type=Path, help="the workflow file (.json, as saved or exported by ComfyUI)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes on this machine (one per GPU; on the CPU, gloo); 1 = a plain run")
    p.add_argument("--node", help="the id of the trainer node when the workflow has several")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a rank waits for the others (e.g. for rank 0 to encode the dataset)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the workflow as the server would, print it in API format with the trainer's id "
                        "as JSON, and stop before running anything")
    p.add_argument("--shard-base", action="store_true",
                   help="split the frozen base model's weights across the processes (FSDP2) instead of a whole "
                        "copy on each; 2 or more processes")
    _internal(p)
    return p


def _internal(p: argparse.ArgumentParser) -> None:
    """What a trainer node passes when it starts this script itself (its ``processes`` input)."""
    p.add_argument("--events", action="store_true", help=argparse.SUPPRESS)  # rank 0's events as JSON lines
    p.add_argument("--folders", type=Path, help=argparse.SUPPRESS)  # the server's folder_paths, as JSON


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def launch(argv: list[str]) -> int:
    """Start the ranks (or, for one process and no torchrun option, the plain run in this process)."""
    ours, comfy_args = _split(argv)
    opts, torchrun_opts = _parser().parse_known_args(ours)
    if opts.processes < 1:
        _parser().error("--processes must be 1 or more")
    if not opts.workflow.is_file():
        _parser().error(f"{opts.workflow} is not a file")
    if opts.shard_base and opts.processes == 1 and not torchrun_opts:
        _parser().error(SHARD_NEEDS_RANKS)
    # The ranks' option is --trainer: torchrun would read --node as an abbreviation of its --node-rank.
    rank_args = [str(opts.workflow.resolve()), "--timeout", str(opts.timeout)] + (
        ["--trainer", opts.node] if opts.node else []) + (["--events"] if opts.events else []) + (
        ["--folders", str(opts.folders.resolve())] if opts.folders else []) + (
        ["--shard-base"] if opts.shard_base else [])
    if opts.dry_run:
        return run_rank(rank_args + ["--dry-run", "--", *comfy_args])
    if opts.processes == 1 and not torchrun_opts:
        return run_rank(rank_args + ["--", *comfy_args])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(opts.processes),
           *torchrun_opts, str(Path(__file__).resolve()), "--rank", *rank_args, "--", *comfy_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", _threads(opts.processes))}
    code = subprocess.call(cmd, env=env)
    if code:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        log.error("scripts/train: training stopped: a process failed or was killed (torchrun's report above "
                  "names it under 'Root Cause'; torchrun stopped the others). Rank 0 writes every file through a "
                  "temporary file, so the newest checkpoint is whole: set resume on to continue from it.")
    return code


def _threads(processes: int) -> str:
    """CPU threads per rank: the cores shared out (torchrun's default of 1 starves a CPU run)."""
    return str(max(1, (os.cpu_count() or 1) // processes))


def pick_trainer(prompt: dict, node: str | None) -> str:
    found = [k for k, v in prompt.items() if isinstance(v, dict) and v.get("class_type") in TRAINERS]
    if node is not None:
        if node not in found:
            raise ValueError(f"node {node} is not a trainer node; the trainers here: "
                             f"{', '.join(found) or 'none'}")
        return node
    if len(found) != 1:
        raise ValueError(f"the workflow has {len(found) or 'no'} trainer nodes "
                         f"({', '.join(found)}); " + ("pick one with --node ID" if found else
                                                       f"it needs one of: {', '.join(TRAINERS)}"))
    return found[0]


def _read(path: Path) -> dict:
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read as a workflow (JSON saved by ComfyUI): {e}") from None
    if not isinstance(workflow, dict):
        raise ValueError(f"{path} is not a workflow: it holds a {type(workflow).__name__}, not an object")
    return workflow


def run_rank(argv: list[str]) -> int:
    """One rank: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) says which; none: the only one."""
    ours, comfy_args = _split(argv)
    p = argparse.ArgumentParser(prog="scripts/train (rank)")
    p.add_argument("workflow", type=Path)
    p.add_argument("--trainer", dest="node")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--shard-base", action="store_true")
    _internal(p)
    opts = p.parse_args(ours)
    os.environ[IN_RANK] = "1"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(message)s" if world > 1 else "%(message)s")
    _one_gpu_each(int(os.environ.get("LOCAL_RANK", "0")), world)
    import torch  # after the device choice above

    headless = _tools()
    try:
        headless.start(comfy_args, cpu=not torch.cuda.is_available())
        if opts.folders:
            headless.use_folders(json.loads(opts.folders.read_text()))
        prompt = headless.as_prompt(_read(opts.workflow))
        node = pick_trainer(prompt, opts.node)
        if opts.shard_base:
            if world < 2:  # e.g. torchrun options that start one process
                raise ValueError(SHARD_NEEDS_RANKS)
            os.environ[SHARD_ENV] = "1"
        headless.validate(prompt, node)
    except (headless.HeadlessError, ValueError, OSError) as e:
        log.error("scripts/train: %s", e)
        return 2
    if opts.dry_run:
        sys.stdout.write(json.dumps({"node": node, "prompt": prompt}) + "\n")
        return 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=opts.timeout))
    try:
        if rank == 0:
            _send_events() if opts.events else _show_progress()
        elif world > 1:  # rank 0 runs the nodes before the trainer first, so dataset caches are written once
            torch.distributed.barrier()
        headless.execute(prompt, node)
    except headless.HeadlessError as e:
        log.error("scripts/train: %s", e)
        return 1
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


def _one_gpu_each(local_rank: int, world: int) -> None:
    """Each rank on a machine sees one GPU (the local_rank-th of those visible), before torch starts CUDA;
    ComfyUI then uses it as its only device."""
    if world == 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(64)]
    if local_rank < len(devices):
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank]


def _events():
    """The pack's nodes/events.py as the headless ComfyUI imported it."""
    return next(m for m in list(sys.modules.values())
                if getattr(m, "__file__", None) and Path(m.__file__).resolve() == HERE.parent / "nodes" / "events.py")


def _send_events() -> None:
    """Rank 0's events as JSON lines on stdout, for the trainer node that started this run."""

    def on_event(event: str, data: dict) -> None:
        sys.stdout.write(EVENT_LINE + json.dumps({"event": event, "data": data}) + "\n")
        sys.stdout.flush()

    _events().listen(on_event)


def _show_progress() -> None:
    """A tqdm bar with the loss on rank 0, fed by the trainer's loss events (no server here)."""
    from tqdm import tqdm

    events = _events()
    bar: dict = {}

    def on_event(event: str, data: dict) -> None:
        if event != events.LOSS_EVENT or not data.get("steps"):
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=data["total"], desc="training", unit="step", dynamic_ncols=True)
        b = bar["bar"]
        b.update(data["steps"][-1] - b.n)
        b.set_postfix(loss=f"{data['losses'][-1]:.4f}")
        if b.n >= b.total:
            b.close()

    events.listen(on_event)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        sys.exit(run_rank(sys.argv[2:]))
    sys.exit(launch(sys.argv[1:]))
