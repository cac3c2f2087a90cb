"""Faults, through the server: a disk that fills up while the pack saves (a small tmpfs mounted as the
folder), the server killed with SIGKILL in the middle of training and restarted, and storms of
``/interrupt`` during sampling with every patch and during both trainers."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .fuzz import TWEAKS
from .session import Session, nodes_of, with_inputs

log = logging.getLogger("supercond.stress")


@dataclass
class FaultTally:
    injected: int = 0
    lost: list[str] = field(default_factory=list)  # a checkpoint that no longer loads, or resume that differs
    temps_left: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)  # model state that changed after a storm
    differ: list[str] = field(default_factory=list)  # an image after a storm unlike a fresh server's
    not_run: list[str] = field(default_factory=list)  # faults this machine could not inject


def small(session: Session, name: str, node: str, **extra) -> dict:
    prompt = session.example(name)
    for nid in nodes_of(prompt, node):
        prompt[nid]["inputs"].update({k: v for k, v in TWEAKS.get(node, {}).items() if k in prompt[nid]["inputs"]})
        prompt[nid]["inputs"].update(extra)
    return prompt


def reseed(prompt: dict, seed: int) -> dict:
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    for node in out.values():
        for key in ("seed", "noise_seed"):
            if isinstance(node["inputs"].get(key), int):
                node["inputs"][key] = seed
    return out


def loads(path: Path) -> bool:
    """A checkpoint file reads completely (safetensors) or unpickles safely (a state)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        else:
            torch.load(path, weights_only=True, map_location="cpu")
        return True
    except Exception:  # any failure is what we count
        return False


# -- disk full ---------------------------------------------------------------------------------------
@contextmanager
def tmpfs(folder: Path, size_kb: int):
    """``folder`` on a tmpfs of ``size_kb`` (needs root and mount); yields False where it cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free > leave:
        (folder / ".filler").write_bytes(bytes(free - leave))


def disk_full(session: Session, tally: FaultTally, quick: bool = False) -> None:
    """Each writer with its folder on a small tmpfs, the disk then filled: the run reports it, the
    previous checkpoint still loads, no temporary file is left, and after freeing space resume works.
    (quick: not the head trainer, whose saves take the same path as the LoRA trainer's.)"""
    srv = session.server
    cases = [("lora", srv.loras_dir, small(session, "lora_train", "SupercondTrainLoRA", save_every=1)),
             ("head", srv.heads_dir, small(session, "singlepass_distill", "SupercondTrainHead", save_every=1)),
             ("schedule", srv.schedules_dir, small(session, "schedule_fit", "SupercondFitSchedule"))]
    cases = [c for c in cases if not (quick and c[0] == "head")]
    for what, folder, graph in cases:
        trainer = next(k for k, v in graph.items() if v["class_type"] in
                       ("SupercondTrainLoRA", "SupercondTrainHead", "SupercondFitSchedule"))
        prefix = f"full_{what}/{what}"
        graph = with_inputs(graph, trainer, filename_prefix=prefix)
        if what != "schedule":
            graph = with_inputs(graph, trainer, steps=1, resume=True)
        with tmpfs(folder, 32 * 1024) as mounted:
            if not mounted:
                tally.not_run.append(f"disk full ({what}): no tmpfs here")
                continue
            first = session.run(graph)
            if first.status != "success":
                tally.lost.append(f"disk full ({what}): the first run failed: {first.messages}")
                continue
            kept = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            fill(folder, 2048)  # room for a few kB: the next save cannot fit
            longer = with_inputs(graph, trainer, steps=3) if what != "schedule" else with_inputs(graph, trainer, seed=1)
            out = session.run(longer)
            tally.injected += 1
            if out.status != "error" or out.unreadable or not any("disk is full" in m or "stopped short" in m
                                                                   for m in out.messages):
                tally.unreadable.append(f"disk full ({what}): {out.status} {out.messages!r:.300}")
            for p, data in kept.items():
                if not p.exists() or p.read_bytes() != data or not loads(p):
                    tally.lost.append(f"disk full ({what}): {p.name} changed or unreadable")
            temps = [str(p) for p in folder.rglob(".tmp_*")]
            tally.temps_left += temps
            (folder / ".filler").unlink()
            again = session.run(longer)
            if again.status != "success":
                tally.lost.append(f"disk full ({what}): after freeing space the run failed: {again.messages}")
            log.info("stress faults: disk full (%s) -> %s %s", what, out.status, (out.messages or [""])[0][:200])
    # The dataset cache is only a cache: a full disk there is a warning, and the training runs.
    cache = srv.workdir / "user" / "supercond_cache"
    with tmpfs(cache, 64) as mounted:
        if mounted:
            fill(cache, 1024)
            graph = small(session, "lora_train", "SupercondTrainLoRA", seed=77)
            out = session.run(graph)
            tally.injected += 1
            if out.status != "success":
                tally.lost.append(f"disk full (dataset cache): the training failed: {out.messages}")
            tally.temps_left += [str(p) for p in cache.rglob(".tmp_*")]
        else:
            tally.not_run.append("disk full (dataset cache): no tmpfs here")


# -- SIGKILL and resume -------------------------------------------------------------------------------
def killed_and_resumed(session: Session, tally: FaultTally, rng: random.Random, steps: int = 6) -> None:
    """Kill -9 the server once a checkpoint exists (at a random moment after it), restart it, resume:
    the result equals an uninterrupted run bit for bit, and every file under its real name loads."""
    srv = session.server
    graph = small(session, "lora_train", "SupercondTrainLoRA")
    trainer = nodes_of(graph, "SupercondTrainLoRA")[0]
    ref = session.run(with_inputs(graph, trainer, steps=steps, save_every=2, filename_prefix="kill_ref/lora"))
    if ref.status != "success":
        raise RuntimeError(f"the uninterrupted run failed: {ref.messages}")
    run = with_inputs(graph, trainer, steps=steps, save_every=2, filename_prefix="kill/lora", resume=True)
    pid, refused = session.queue(run)
    if pid is None:
        raise RuntimeError(f"queueing the run to kill failed: {refused.messages}")
    first = srv.loras_dir / "kill" / "lora_000002.state.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    tally.injected += 1
    for p in (srv.loras_dir / "kill").iterdir():
        if not p.name.startswith(".tmp_") and not loads(p):
            tally.lost.append(f"SIGKILL: {p.name} does not load")
    srv.start()
    out = session.run(run)
    if out.status != "success":
        tally.lost.append(f"SIGKILL: resume failed: {out.status} {out.messages}")
        return
    tally.temps_left += [str(p) for p in (srv.loras_dir / "kill").glob(".tmp_*")]
    from safetensors.torch import load_file

    a = load_file(str(srv.loras_dir / "kill" / f"lora_{steps:06d}.safetensors"))
    b = load_file(str(srv.loras_dir / "kill_ref" / f"lora_{steps:06d}.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not same:
        tally.lost.append("SIGKILL: the resumed LoRA differs from the uninterrupted run")
    log.info("stress faults: SIGKILL during training, restart, resume -> %s", "bit-identical" if same else "DIFFERS")


# -- interrupt storms ---------------------------------------------------------------------------------
STORMS = ["cep_sampling", "cads_sampling", "noise_correction", "singlepass_ksampler", "singlepass_guider",
          "schedule_sigmas_offset_noise", "lora_train", "singlepass_distill", "schedule_fit", "epsilon_scaling_sd3",
          "cads_flow_sd3"]
TRAINERS = {"lora_train": "SupercondTrainLoRA", "singlepass_distill": "SupercondTrainHead",
            "schedule_fit": "SupercondFitSchedule"}


def storm_graphs(session: Session, quick: bool) -> dict[str, dict]:
    names = ["cep_sampling", "singlepass_ksampler", "lora_train", "epsilon_scaling_sd3"] if quick else STORMS
    out = {}
    for name in names:
        g = small(session, name, TRAINERS[name]) if name in TRAINERS else session.example(name)
        if name in TRAINERS:  # longer runs, so that interrupts land inside the steps
            g = with_inputs(g, nodes_of(g, TRAINERS[name])[0], steps=4)
        out[name] = g
    return out


def interrupt_storms(session: Session, reference: Session, tally: FaultTally, rng: random.Random,
                     per_graph: int) -> int:
    """``per_graph`` interrupts at random moments into runs of each graph; then the shared model of each
    checkpoint is as before (wrappers, hooks, parameters) and each graph's image equals a fresh server's."""
    from supercond.tools import workflows

    graphs = storm_graphs(session, per_graph < 4)
    sent = 0
    by_ckpt: dict[str, list[str]] = {}
    for name, g in graphs.items():
        for ckpt in workflows.checkpoints_used(g) or ["(no checkpoint)"]:
            by_ckpt.setdefault(ckpt, []).append(name)
    for ckpt, names in by_ckpt.items():
        before = session.fingerprint(ckpt) if ckpt != "(no checkpoint)" else None
        for name in names:
            g = graphs[name]
            t0 = time.monotonic()
            first = session.run(reseed(g, 10_000))
            span = max(time.monotonic() - t0, 0.2)
            if first.status != "success":
                raise RuntimeError(f"{name} fails without interrupts: {first.messages}")
            for i in range(per_graph):
                pid, refused = session.queue(reseed(g, 10_001 + i))
                if pid is None:
                    raise RuntimeError(f"{name}: {refused.messages}")
                time.sleep(rng.uniform(0.0, span))
                session.interrupt()
                sent += 1
                out = session.wait(pid, deadline=120)
                if out.status not in ("interrupted", "success") or out.unreadable:
                    tally.unreadable.append(f"storm {name}: {out.status} {out.messages!r:.200}")
        if before is not None:
            after = session.fingerprint(ckpt)
            changed = sorted(k for k in before if before[k] != after[k])
            if changed:
                tally.leaked.append(f"{ckpt} after storms of {names}: {changed}")
        for name in names:  # the next prompt gives a fresh server's image
            mine = session.images_of(reseed(graphs[name], 1))
            theirs = reference.images_of(reseed(graphs[name], 1))
            if mine != theirs:
                tally.differ.append(f"{name}: the image after the storm differs from a fresh server's")
        log.info("stress faults: %d interrupts into %s on %s", per_graph * len(names), names, ckpt)
    tally.injected += sent
    return sent
