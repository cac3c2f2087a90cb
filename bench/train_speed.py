"""Time per training step and peak memory: SupercondTrainLoRA vs ComfyUI's TrainLoraNode vs the bare
forward + backward of the same UNet, side by side in one process (same model, latent, prompt, rank,
batch 1, fp32 on the CPU).

    python bench/train_speed.py [--model sd15|sdxl] [--rank 8] [--size 256] [--steps 6] [--rounds 3]
                                [--threads 1] [--profile] [--no-memory]
    python bench/train_speed.py --paired 16 [--model sd15|sdxl] [--rank 8]   (the trainer's step vs bare)

Rows:
- ComfyUI TrainLoraNode: the stock node (AdamW, MSE, no gradient checkpointing, fp32).
- SupercondTrainLoRA: our node (AdamW, grad-norm clip 1.0) with lora_layers "transformer", kohya's default
  LoRA layer set (attention, feed-forward, proj_in/out).
- SupercondTrainLoRA, all: lora_layers "all" (the node's default: the ResBlocks too, like kohya's LoCon).
- bare forward+backward: the UNet with no LoRA, backward to the input (every layer backpropagates).
- bare + LoRA fwd+bwd: our LoRA hooks on the "transformer" set, forward + backward only: the LoRA's own
  compute.

A step's time is taken inside a run: every optimizer step (a global post-step hook) stamps the clock,
so a step is the gap between two stamps (the first step of a run is dropped: allocator and thread
pools warm up). The bare rows time each iteration. Runs of all rows alternate, in a seeded shuffled
order per round; the ratios are taken within each round and the median over rounds is reported
with its range. On the CPU the clock is the process's CPU time (one thread by default: on a 2-core
shared box, two threads made single steps vary 1.7-15 s); on CUDA, wall time after a synchronize.
The machine's speed still drifts within a round, so for the ratio to bare use ``--paired``, which
alternates single steps on one loaded model; this table is for TrainLoraNode and memory.

Peak memory is measured in a fresh subprocess per row (so no row inherits another's allocator
state): on CUDA the allocator's peak above the loaded model, on the CPU the sampled peak of the C heap
in use (glibc mallinfo2; RSS would hide what the allocator reuses from the model load) above the level
after loading (weight copies, LoRA, activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from _common import PeakHeap, header, import_pack, setup_logging

log = logging.getLogger("supercond.bench")
CKPTS = {"sd15": "supercond_sd15_tiny.safetensors", "sdxl": "supercond_sdxl_tiny.safetensors"}
ROWS = ("ComfyUI TrainLoraNode", "SupercondTrainLoRA", "SupercondTrainLoRA, all", "bare forward+backward",
        "bare + LoRA fwd+bwd")


def clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class Bench:
    """The loaded checkpoint and one function per row: ``run(row, steps) -> [seconds per step]``."""

    def __init__(self, args: argparse.Namespace) -> None:
        import_pack()
        from supercond.tools import paths
        from supercond.tools.inprocess import ensure_fixtures, setup_comfy_imports

        comfyui = paths.find_comfyui()
        setup_comfy_imports(comfyui)
        models = ensure_fixtures(comfyui)
        import folder_paths
        import nodes

        folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
        folder_paths.folder_names_and_paths["loras"] = ([tempfile.mkdtemp()], folder_paths.supported_pt_extensions)
        self.args, self.ckpt = args, CKPTS[args.model]
        _, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(self.ckpt)
        self.cond = nodes.CLIPTextEncode().encode(clip, "a red disc")[0]
        side = args.size // 8
        self.latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
        self.stamps: list[float] = []
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: self.stamps.append(clock()))

    def fresh(self) -> Any:
        """A freshly loaded model on the device, so no run sees another's patches or weight copies."""
        import comfy.model_management as mm
        import nodes

        model = nodes.CheckpointLoaderSimple().load_checkpoint(self.ckpt)[0]
        mm.load_models_gpu([model], force_full_load=True)
        return model

    def run(self, row: str, model: Any, steps: int) -> list[float]:
        """Seconds per step of one ``steps``-step run of ``row`` (its first step dropped)."""
        self.stamps = []
        if row.startswith("bare"):
            self.bare(model, steps, with_lora="LoRA" in row)
        elif row.startswith("SupercondTrainLoRA"):
            self.ours(model, steps, "all" if row.endswith("all") else "transformer")
        else:
            self.comfy_node(model, steps)
        return [b - a for a, b in zip(self.stamps[1:-1], self.stamps[2:], strict=True)]

    def ours(self, model: Any, steps: int, layers: str) -> None:
        from supercond.nodes.train.lora import SupercondTrainLoRA

        r = self.args.rank
        SupercondTrainLoRA.execute(
            model, {"samples": self.latent}, self.cond, steps=steps, learning_rate=1e-4, rank=r, alpha=float(r),
            batch_size=1, grad_accumulation=1, prediction="auto", loss_weighting="none", min_snr_gamma=5.0,
            cep_gamma=0.0, cep_distribution="uniform", input_perturbation=0.0, offset_noise=0.0,
            pyramid_iterations=0, caption_dropout=0.0, seed=0, gradient_checkpointing=False,
            lr_schedule="constant", warmup_steps=0, max_grad_norm=1.0, save_every=0,
            filename_prefix=f"bench/s{time.time_ns()}", resume=False, lora_layers=layers)

    def comfy_node(self, model: Any, steps: int) -> None:
        from comfy_extras.nodes_train import TrainLoraNode

        TrainLoraNode().train(model, {"samples": self.latent}, self.cond, batch_size=1, steps=steps, grad_accumulation_steps=1,
                              learning_rate=1e-4, rank=self.args.rank, optimizer="AdamW", loss_function="MSE",
                              seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                              gradient_checkpointing=False, existing_lora="[None]")

    def trainable(self, model: Any) -> tuple:
        """(clone, device, model call, cond rows, the first row on the device, latent, sigma 1): a loaded
        clone whose weights autograd can use, and one call's inputs (call under inference_mode(False))."""
        import comfy.model_management as mm

        from supercond.nodes import family as fm
        from supercond.nodes.train import model as tm
        from supercond.nodes.train.lora_run import conds_from

        mp = model.clone()
        mm.load_models_gpu([mp], force_full_load=True)
        dev = mp.load_device
        tm.materialize_weights(mp.model.diffusion_model)
        rows, _ = conds_from(self.cond)
        ctx = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in rows[0].items()}]
        return (mp, dev, fm.ModelCall(mp, dev), rows, ctx, fm.latent_in(mp, self.latent).to(dev),
                torch.tensor([1.0], device=dev))

    def bare(self, model: Any, steps: int, with_lora: bool) -> None:
        from supercond.core.lora import LoRANetwork
        from supercond.nodes import family as fm

        with torch.inference_mode(False), torch.enable_grad():
            mp, dev, call, rows, ctx, x, s = self.trainable(model)
            r = self.args.rank
            net = LoRANetwork(fm.lora_layers(mp, "bench", "transformer"), r, float(r), torch.Generator().manual_seed(0), dev)
            with net.attached() if with_lora else nullcontext():
                for _ in range(steps):
                    xi = x if with_lora else x.clone().requires_grad_(True)
                    call(xi, s, ctx).pow(2).mean().backward()
                    net.zero_grad(set_to_none=True)
                    self.stamps.append(clock())


def peak_memory_mib(bench: Bench, row: str, steps: int) -> float:
    """Peak memory of one run of ``row`` above the loaded model (run this in a fresh process)."""
    model = bench.fresh()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        bench.run(row, model, steps)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakHeap() as peak:
        bench.run(row, model, steps)
    return peak.peak_mb


def memory_table(args: argparse.Namespace) -> dict[str, float]:
    """Each row's peak memory, each in its own subprocess of this script."""
    out = {}
    for row in ROWS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--rank", str(args.rank),
               "--size", str(args.size), "--threads", str(args.threads), "--steps", str(args.steps),
               "--memory-row", row]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY "))
        out[row] = json.loads(line[len("MEMORY "):])["mib"]
        log.info("peak memory %-26s %.0f MiB", row, out[row])
    return out


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15", choices=list(CKPTS))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every row, in a shuffled order each round")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (ignored on CUDA)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of our trainer")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="instead: N paired iterations of single steps on one loaded model (see paired_steps)")
    ap.add_argument("--memory-row", help=argparse.SUPPRESS)  # internal: measure one row's memory, print it
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    if args.paired:
        paired_steps(bench, args.paired)
        return
    if args.memory_row:
        with torch.inference_mode():
            print("MEMORY " + json.dumps({"mib": peak_memory_mib(bench, args.memory_row, args.steps)}))  # noqa: T201
        return
    rounds: list[dict[str, list[float]]] = []
    order = list(ROWS)
    shuffle = random.Random(0).shuffle
    with torch.inference_mode():  # as ComfyUI runs nodes
        for row in ROWS:
            bench.run(row, bench.fresh(), 2)  # warm-up: first loads, allocator, thread pools
        for rnd in range(args.rounds):
            shuffle(order)
            rounds.append({})
            for row in order:
                rounds[-1][row] = times = bench.run(row, bench.fresh(), args.steps)
                log.info("round %d %-26s %s", rnd, row, " ".join(f"{t:.3f}" for t in times))
        if args.profile:
            _profile(bench, args.steps)
    memory = {} if args.no_memory else memory_table(args)
    _table(args, rounds, memory)


def _profile(bench: Bench, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        bench.run("SupercondTrainLoRA", bench.fresh(), steps)
    log.info(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def paired_steps(bench: Bench, iterations: int) -> None:
    """The trainer's step against the bare forward + backward, one step of each per iteration in a shuffled
    order on ONE loaded model: drift between whole runs (this 2-core VM's speed moves by 10-20 % over
    minutes) cancels in each iteration's ratio. The trainer's step is core.train.Trainer.train_step as the
    node drives it (batch draw, loss, backward, clipping, AdamW), LoRA on each layer set."""
    from supercond.core.lora import LoRANetwork
    from supercond.core.seeds import seeded_generator
    from supercond.core.train import TrainConfig, Trainer
    from supercond.nodes import family as fm
    from supercond.nodes.train import model as tm
    from supercond.nodes.train.lora_run import text_parts

    r = bench.args.rank
    with torch.inference_mode():
        model = bench.fresh()
    with torch.inference_mode(False), torch.enable_grad():
        mp, dev, call, rows, ctx, x, s = bench.trainable(model)
        sigmas = mp.get_model_object("model_sampling").sigmas
        steps = {}
        for layers in ("transformer", "all"):
            net = LoRANetwork(fm.lora_layers(mp, "bench", layers), r, float(r), seeded_generator(0, 0x10BA), dev)
            cfg = TrainConfig(steps=10**6, rank=r, alpha=float(r), max_grad_norm=1.0,
                              prediction=tm.auto_prediction(mp, "auto", "bench"))
            trainer = Trainer(cfg, list(net.parameters()), call, sigmas, x, rows, None, dev,
                              text_parts=text_parts(fm.family_of(mp, "bench")))
            steps[f"trainer step, {layers}"] = (net, trainer.train_step)

        def bare() -> None:
            call(x.clone().requires_grad_(True), s, ctx).pow(2).mean().backward()

        def run(name: str) -> float:
            t0 = clock()
            if name == "bare forward+backward":
                bare()
            else:
                net, step = steps[name]
                with net.attached(), tm.trainable(mp):
                    step()
            return clock() - t0

        names = ["bare forward+backward", *steps]
        for name in names:  # warm-up
            run(name)
        times: dict[str, list[float]] = {n: [] for n in names}
        shuffle = random.Random(0).shuffle
        for it in range(iterations):
            shuffle(names)
            for name in names:
                times[name].append(run(name))
            log.info("iteration %d %s", it, " ".join(f"{n}={times[n][-1]:.3f}" for n in sorted(times)))
    log.info(header(f"paired single steps: {bench.args.model} fixture, {bench.args.size} px, batch 1, rank {r}, "
                    f"fp32; {iterations} iterations"))
    log.info(f"| {'step':26} | {'median s':>8} | {'x bare, median of per-iteration ratios (IQR)':>44} |")
    log.info(f"|{'-' * 28}|{'-' * 10}|{'-' * 46}|")
    for name in sorted(times):
        ratios = [a / b for a, b in zip(times[name], times["bare forward+backward"], strict=True)]
        q = statistics.quantiles(ratios, n=4)
        log.info(f"| {name:26} | {statistics.median(times[name]):8.3f} | "
                 f"{statistics.median(ratios):30.3f} ({q[0]:.3f}-{q[2]:.3f}) |")


def _table(args: argparse.Namespace, rounds: list[dict[str, list[float]]], memory: dict[str, float]) -> None:
    """The medians, and each row's ratios to bare and to TrainLoraNode paired within a round (the rows of
    a round ran back to back, so drift between rounds cancels): the median of the per-round ratios."""
    steps = {row: [t for r in rounds for t in r[row]] for row in ROWS}
    med = {row: statistics.median(v) for row, v in steps.items()}

    def paired(row: str, ref: str) -> tuple[float, float, float]:
        ratios = sorted(statistics.median(r[row]) / statistics.median(r[ref]) for r in rounds)
        return statistics.median(ratios), ratios[0], ratios[-1]

    dev = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    clock_kind = "wall s" if torch.cuda.is_available() else "CPU s"
    mem_kind = "CUDA peak MiB" if torch.cuda.is_available() else "peak heap MiB"
    log.info(header(f"LoRA training step: {args.model} fixture, {args.size} px, batch 1, rank {args.rank}, fp32, "
                    f"{dev}; {len(steps['SupercondTrainLoRA'])} steps per row in {args.rounds} rounds"))
    log.info(f"| {'row':26} | {clock_kind + '/step':>11} | {'x bare (range)':>18} | {'x TrainLoraNode (range)':>23} | "
             f"{mem_kind:>13} |")
    log.info(f"|{'-' * 28}|{'-' * 13}|{'-' * 20}|{'-' * 25}|{'-' * 15}|")
    for row in ROWS:
        b, c = paired(row, "bare forward+backward"), paired(row, "ComfyUI TrainLoraNode")
        mem = f"{memory[row]:13.0f}" if row in memory else f"{'-':>13}"
        log.info(f"| {row:26} | {med[row]:11.3f} | {b[0]:5.2f} ({b[1]:4.2f}-{b[2]:4.2f}) | "
                 f"{c[0]:10.2f} ({c[1]:4.2f}-{c[2]:4.2f}) | {mem} |")


if __name__ == "__main__":
    main()
