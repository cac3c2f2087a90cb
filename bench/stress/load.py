"""A load test: a queue of mixed prompts (every patch, on two models and several clones of each,
interleaved with short runs of both trainers, the schedule fit and stock graphs) queued at once;
every image must equal the same prompt's image run alone on a fresh server."""

from __future__ import annotations

import copy
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .faults import TRAINERS, reseed, small
from .session import Session

log = logging.getLogger("supercond.stress")

PATCHES = ["cep_sampling", "cads_sampling", "cep_static", "noise_correction", "singlepass_ksampler",
           "singlepass_guider", "schedule_sigmas_offset_noise", "cads_flow_sd3", "epsilon_scaling_sd3", "lora_load"]


@dataclass
class LoadTally:
    prompts: int = 0
    unique: int = 0
    differ: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def stock(prompt: dict) -> dict:
    """The same graph with every Supercond patch taken out: the KSampler reads the loader's MODEL."""
    out = copy.deepcopy(prompt)
    for nid in [k for k, v in out.items() if v["class_type"].startswith("Supercond")]:
        src = out[nid]["inputs"].get("model") or out[nid]["inputs"].get("conditioning")
        if not isinstance(src, list):
            return prompt
        del out[nid]
        for node in out.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[:1] == [nid]:
                    node["inputs"][name] = list(src)
    return out


def clones(prompt: dict) -> dict:
    """The graph's sampler chain twice more, on the loader's MODEL directly and on the patched one with
    another seed: three samplings of clones of one model in one prompt."""
    out = copy.deepcopy(prompt)
    sampler = next((k for k, v in out.items() if v["class_type"] == "KSampler"), None)
    loader = next((k for k, v in out.items() if v["class_type"] == "CheckpointLoaderSimple"), None)
    if sampler is None or loader is None:
        return prompt
    chain = [sampler] + [k for k, v in out.items() if v["inputs"].get("samples") == [sampler, 0]]
    chain += [k for k, v in out.items() if any(v["inputs"].get(i) == [c, 0] for c in chain[1:] for i in ("images",))]
    top = max(int(k) for k in out)
    for copy_no, (model, seed) in enumerate(((loader, 3), (out[sampler]["inputs"]["model"][0], 4)), start=1):
        rename = {c: str(top + 100 * copy_no + i) for i, c in enumerate(chain)}
        for c in chain:
            node = copy.deepcopy(out[c])
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[0] in rename:
                    node["inputs"][name] = [rename[value[0]], value[1]]
            if c == sampler:
                node["inputs"]["model"] = [model, 0]
                node["inputs"]["seed"] = seed
            out[rename[c]] = node
    return out


def mixed(session: Session, quick: bool) -> dict[str, dict]:
    """The distinct graphs of the queue."""
    names = ["cep_sampling", "cads_sampling", "singlepass_ksampler", "epsilon_scaling_sd3"] if quick else PATCHES
    graphs = {name: session.example(name) for name in names}
    graphs |= {f"{name}+clones": clones(graphs[name]) for name in list(graphs)[:1 if quick else 5]}
    graphs |= {f"{name}-stock": stock(graphs[name]) for name in ("cep_sampling", "epsilon_scaling_sd3")}
    trainers = ["lora_train"] if quick else list(TRAINERS)
    for name in trainers:
        g = small(session, name, TRAINERS[name])
        graphs[name] = g
    return graphs


def load_test(session: Session, workdir: Path, models: Path, quick: bool, rng: random.Random,
              reference: Session | None = None) -> LoadTally:
    """``reference`` None: each distinct prompt alone on a fresh server of its own; else one after another
    on that server (one that never ran the queue)."""
    tally = LoadTally()
    graphs = mixed(session, quick)
    seeds = [1] if quick else [1, 2]
    repeats = 2 if quick else 8
    jobs = [(name, s) for name in graphs for s in seeds] * repeats
    rng.shuffle(jobs)
    tally.unique = len(graphs) * len(seeds)
    # Queue everything at once, then collect.
    queued = []
    for name, s in jobs:
        pid, refused = session.queue(reseed(graphs[name], s))
        if pid is None:
            tally.failed.append(f"{name} seed {s}: {refused.messages}")
            continue
        queued.append((name, s, pid))
    tally.prompts = len(queued)
    got: dict[tuple[str, int], list[list[bytes]]] = {}
    for name, s, pid in queued:
        out = session.wait(pid, deadline=900)
        if out.status != "success":
            tally.failed.append(f"{name} seed {s}: {out.status} {out.messages}")
            continue
        got.setdefault((name, s), []).append(session.pixels(out))
    log.info("stress load: %d prompts queued at once, %d distinct", tally.prompts, tally.unique)
    for (name, s), runs in sorted(got.items()):
        if reference is None:
            shutil.rmtree(workdir / "alone", ignore_errors=True)
            with Session(workdir / "alone", models) as fresh:
                alone = fresh.images_of(reseed(graphs[name], s))
        else:
            alone = reference.images_of(reseed(graphs[name], s))
        for i, run in enumerate(runs):
            if run != alone:
                tally.differ.append(f"{name} seed {s} (run {i + 1} of {len(runs)} in the queue)")
    return tally
