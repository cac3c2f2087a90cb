"""What data-parallel training costs here: scripts/train on 1 process (batch 2b) and on 2 processes (batch b
each, gloo on the CPU), also with the base model sharded (--shard-base, FSDP2), the same global batch, side
by side in rotating rounds; the bytes DDP all-reduces per step and the base weights each rank holds; and,
on paper, the all-reduce's and the sharded base's all-gathers' share of a step on 8 GPUs from NCCL's
bandwidth model.

    python bench/train_distributed.py [--steps 30] [--rounds 3] [--batch 1] [--rank 8] [--size 64]

Each run is the lora_train example on the SD1.x fixture (shrunk to --size pixels), through scripts/train.
A step's time is the trainer's own log line (rank 0: seconds a step after the first, so model loading and
process start-up are not in it). On 2 CPU cores two processes share the cores one process had: expect no
speed-up here; the number to read is the overhead (time per sample, 2 processes over 1).

On paper (no GPU was lent when this was written; run it on one and add the row): a ring all-reduce of S
bytes over n GPUs moves 2(n-1)/n * S through each GPU's link (nccl-tests, doc/PERFORMANCE.md: busbw =
algbw * 2(n-1)/n), so it takes about 2(n-1)/n * S / busbw + latency; an all-gather of S bytes moves
(n-1)/n * S (busbw = algbw * (n-1)/n). A sharded base is all-gathered twice a step (forward, and again in
backward: FSDP2 frees each block's weights after its forward). The figures assumed are printed with the
table.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from _common import REPO, header, import_pack

log = logging.getLogger("supercond.bench")
STEP_LINE = re.compile(r"training: (\d+) steps, ([0-9.]+) s a step after the first")
SHARD_LINE = re.compile(r"this rank holds ([0-9.]+) of its ([0-9.]+) MiB")
# Assumed for the paper estimate: 8 H100 SXM on NVSwitch. NVLink 4 gives 450 GB/s per direction per GPU
# (NVIDIA's H100 datasheet: 900 GB/s bidirectional); all-reduce bus bandwidth is taken at 80 % of it, and
# a small all-reduce's fixed cost at 30 us.
BUSBW_GBS, LATENCY_S, GPUS = 360.0, 30e-6, 8


def prepare(workdir: Path, size: int) -> tuple[dict, list[str]]:
    """The example's API prompt retargeted to the fixture, and the ComfyUI options of a server's workdir."""
    import_pack()
    from supercond.tools import workflows
    from supercond.tools.inprocess import ensure_fixtures
    from supercond.tools.paths import find_comfyui
    from supercond.tools.server import ComfyClient, ComfyServer

    comfyui = find_comfyui()
    srv = ComfyServer(comfyui, workdir, models_dir=ensure_fixtures(comfyui))
    with srv:
        info = ComfyClient(srv.url).object_info()
    wf = workflows.load(workflows.WORKFLOW_DIR / "lora_train.json")
    prompt = workflows.shrink(workflows.retarget(workflows.to_api(wf, info)), size=size, max_steps=4)
    for node in prompt.values():
        if node["class_type"] == "SupercondLoadDataset":
            node["inputs"]["resolution"] = size
    options = ["--extra-model-paths-config", str(workdir / "extra_model_paths.yaml"),
               "--input-directory", str(workdir / "input"), "--output-directory", str(workdir / "output"),
               "--temp-directory", str(workdir / "temp"), "--user-directory", str(workdir / "user")]
    return prompt, options


def run(prompt: dict, options: list[str], workdir: Path, processes: int, batch: int, steps: int,
        rank: int, shard: bool = False) -> tuple[float, int, tuple[float, float] | None]:
    """(seconds a step, trainable parameters, (MiB of base weights rank 0 held, of the whole) if sharded) of
    one scripts/train run."""
    stem = f"bench_{uuid.uuid4().hex[:6]}"
    p = json.loads(json.dumps(prompt))
    for node in p.values():
        if node["class_type"] == "SupercondTrainLoRA":
            node["inputs"].update(filename_prefix=f"bench/{stem}", steps=steps, save_every=0, batch_size=batch,
                                  rank=rank, sample_every=0, validation_split=0.0)
    path = workdir / f"{stem}.json"
    path.write_text(json.dumps(p))
    r = subprocess.run([str(REPO / "scripts" / "train"), str(path), "--processes", str(processes),
                        *(["--shard-base"] if shard else []), "--", *options],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"scripts/train failed:\n{r.stderr[-3000:]}")
    found = STEP_LINE.findall(r.stderr)
    if not found:
        raise SystemExit(f"no step time in the log:\n{r.stderr[-2000:]}")
    import torch

    state = next((workdir / "loras" / "bench").glob(f"{stem}_*.state.pt"))
    params = sum(t.numel() for t in torch.load(state, weights_only=True)["params"])
    for f in (workdir / "loras" / "bench").glob(f"{stem}_*"):
        f.unlink()
    held = SHARD_LINE.search(r.stderr)
    return float(found[-1][1]), params, (float(held[1]), float(held[2])) if held else None


def allreduce_seconds(nbytes: float, gpus: int = GPUS) -> float:
    return 2 * (gpus - 1) / gpus * nbytes / (BUSBW_GBS * 1e9) + LATENCY_S


def allgather_seconds(nbytes: float, gpus: int = GPUS) -> float:
    return (gpus - 1) / gpus * nbytes / (BUSBW_GBS * 1e9) + LATENCY_S


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="batch per process with 2 processes (1 process: twice)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="supercond_bench_dist_") as tmp:
        workdir = Path(tmp)
        prompt, options = prepare(workdir, args.size)
        configs = [("1", 1, 2 * args.batch, False), ("2", 2, args.batch, False), ("2, --shard-base", 2, args.batch, True)]
        times: dict[str, list[float]] = {c[0]: [] for c in configs}
        params, held = 0, None
        for r in range(args.rounds):
            for name, processes, batch, shard in configs[r % 3:] + configs[:r % 3]:  # each first once in 3
                t, params, found = run(prompt, options, workdir, processes, batch, args.steps, args.rank, shard)
                held = found or held
                times[name].append(t)
                log.info("round %d: %s process(es): %.4f s a step", r + 1, name, t)
    global_batch = 2 * args.batch
    nbytes = params * 4  # float32 LoRA gradients, all-reduced once per optimizer step (no_sync before)
    one = times["1"]
    rows = []
    for name, processes, batch, _ in configs:
        t = times[name]
        ratio = [x / y for x, y in zip(t, one, strict=True)]
        rows.append(f"| {name} | {batch} | {statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f}) | "
                    f"{global_batch / statistics.median(t):.2f} | " + (
                        f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |" if processes > 1 else " |"))
    lines = [header("Data-parallel training: scripts/train on 1 and 2 processes (gloo, CPU)"), "",
             f"SD1.x fixture, lora_train example at {args.size} px, LoRA rank {args.rank}, global batch "
             f"{global_batch}, {args.steps} steps, {args.rounds} rotating rounds (median, range)", "",
             "| processes | batch per process | s a step | samples/s | step time over 1 process |", "|---|---|---|---|---|",
             *rows, "",
             f"All-reduced per optimizer step: {params:,} trainable parameters x 4 bytes = "
             f"{nbytes / 2**20:.2f} MiB (the frozen base model is not all-reduced).", ""]
    if held:
        lines += [f"Base weights held by a rank: {held[1]:.2f} MiB whole, {held[0]:.2f} MiB with --shard-base on 2 "
                  "processes (each block's weights are all-gathered while it runs).", ""]
    lines += [f"On paper, {GPUS} GPUs (ring all-reduce, bus bandwidth {BUSBW_GBS:.0f} GB/s, {LATENCY_S * 1e6:.0f} us "
              "fixed; see the docstring): the all-reduce per optimizer step, and its share of a step that takes t on one "
              "GPU (DDP overlaps it with the backward pass, so the share is an upper bound):", "",
              "| LoRA parameters (float32) | all-reduce | share of a 0.25 s step | share of a 1 s step |", "|---|---|---|---|"]
    for n in (params, 10_000_000, 50_000_000, 200_000_000):
        t = allreduce_seconds(n * 4)
        lines.append(f"| {n:,}{' (this fixture)' if n == params else ''} | {t * 1e3:.2f} ms | "
                     f"{t / (0.25 + t):.1%} | {t / (1 + t):.1%} |")
    lines += ["", f"With --shard-base on {GPUS} GPUs: each rank keeps 1/{GPUS} of the base and all-gathers every "
              "block twice a step (forward, backward); FSDP2 prefetches the next block's all-gather during the "
              "current block's compute, so the time below is hidden when a block's compute takes longer:", "",
              "| base model (bf16) | held per GPU | all-gathers a step |", "|---|---|---|"]
    for name, billions in (("SDXL UNet, 2.6 B", 2.6), ("Flux.1, 12 B", 12.0), ("Qwen-Image, 20 B", 20.0)):
        nbytes_base = billions * 1e9 * 2
        lines.append(f"| {name} | {nbytes_base / GPUS / 2**30:.1f} GiB of {nbytes_base / 2**30:.1f} | "
                     f"{2 * allgather_seconds(nbytes_base) * 1e3:.0f} ms |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    out = REPO / "bench" / "results" / "train_distributed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
