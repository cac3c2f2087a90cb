"""Hostile files where the pack reads, through the server: broken and malicious head, schedule and LoRA
files, trainer states for resume, and dataset folders with symlinks out, a decompression bomb,
truncated images and captions that are not text. Each must be refused with a readable sentence,
run nothing (a malicious pickle would create ``hostile.PWNED``) and write nothing; afterwards the
graph runs again with the good file."""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import hostile
from .fuzz import TWEAKS, _replace
from .session import Session, nodes_of, with_inputs

log = logging.getLogger("supercond.stress")


@dataclass
class FileTally:
    tried: int = 0
    refused: int = 0
    accepted: list[str] = field(default_factory=list)  # ran normally (allowed, documented cases only)
    unreadable: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)  # a payload ran
    written: list[str] = field(default_factory=list)
    canary_failures: list[str] = field(default_factory=list)


ACCEPTED = {"dataset/empty_caption"}  # an empty caption trains on the trigger word / empty prompt, as in kohya


def _small(session: Session, name: str, node: str) -> dict:
    prompt = session.example(name)
    for nid in nodes_of(prompt, node):
        prompt[nid]["inputs"].update({k: v for k, v in TWEAKS.get(node, {}).items() if k in prompt[nid]["inputs"]})
    return prompt


def hostile_files(session: Session, quick: bool = False) -> FileTally:
    tally = FileTally()
    srv = session.server
    hostile.PWNED.unlink(missing_ok=True)

    # Good files to break: a head, a schedule, a LoRA and its state, from the pack's own trainers.
    head_graph = _small(session, "singlepass_distill", "SupercondTrainHead")
    fit_graph = _small(session, "schedule_fit", "SupercondFitSchedule")
    lora_graph = _small(session, "lora_train", "SupercondTrainLoRA")
    for g in (head_graph, fit_graph, lora_graph):
        if (o := session.run(g)).status != "success":
            raise RuntimeError(f"making the good files failed: {o.messages}")
    good_head = max(srv.heads_dir.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    good_schedule = max(srv.schedules_dir.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    lora_states = sorted(srv.loras_dir.rglob("*.state.pt"), key=lambda p: p.stat().st_mtime)
    good_state = lora_states[-1]
    good_lora = good_state.with_name(good_state.name.replace(".state.pt", ".safetensors"))

    session.info = session.client.object_info()
    singlepass = session.example("singlepass_ksampler")
    sched_base = session.example("schedule_sigmas_offset_noise")
    lora_load = session.example("lora_load")

    def check(kind: str, name: str, prompt: dict, canary: dict, expect_ok: bool = False) -> None:
        label = f"{kind}/{name}"
        before = session.files()
        out = session.run(prompt, deadline=300)
        tally.tried += 1
        if hostile.PWNED.exists():
            tally.executed.append(label)
            hostile.PWNED.unlink()
        if out.status == "success":
            (tally.accepted if label in ACCEPTED or expect_ok else tally.unreadable).append(
                label if label in ACCEPTED or expect_ok else f"{label}: ran as if the file were good")
        else:
            tally.refused += 1
            if out.status not in ("error", "rejected") or not out.messages or out.unreadable:
                tally.unreadable.append(f"{label}: {out.status} {out.messages!r:.300}")
        new = [p for p in session.files() - before if "output" not in p.parts and "supercond_cache" not in p.parts]
        if new and not (label in ACCEPTED or expect_ok):
            tally.written.append(f"{label}: {[str(p) for p in new][:3]}")
        if (c := session.run(canary, deadline=600)).status != "success":
            tally.canary_failures.append(f"{label}: {c.status} {c.messages}")
        log.info("stress files: %s -> %s %s", label, out.status, (out.messages or [""])[0][:160])

    variants = hostile.broken_safetensors(good_head.read_bytes())
    if quick:
        variants = {k: variants[k] for k in ("header_beyond_file", "offsets_overlap", "dtype_unknown", "torch_pickle")}
    head_node = nodes_of(singlepass, "SupercondNewHead")[0]
    good_head_name = good_head.relative_to(srv.heads_dir).as_posix()
    head_canary = _replace(singlepass, "SupercondNewHead", "SupercondLoadHead", {"head_name": good_head_name})
    for name, data in variants.items():
        (srv.heads_dir / "stress").mkdir(exist_ok=True)
        (srv.heads_dir / "stress" / f"{name}.safetensors").write_bytes(data)
        prompt = copy.deepcopy(singlepass)
        prompt[head_node] = {"class_type": "SupercondLoadHead",
                             "inputs": {"model": singlepass[head_node]["inputs"]["model"],
                                        "head_name": f"stress/{name}.safetensors"}}
        check("head", name, prompt, head_canary)

    variants = hostile.broken_safetensors(good_schedule.read_bytes())
    if quick:
        variants = {k: variants[k] for k in ("header_not_json", "shape_disagrees", "torch_pickle")}
    good_sched_name = good_schedule.relative_to(srv.schedules_dir).as_posix()
    sched_canary = _replace(sched_base, "SupercondScheduleSigmas", "SupercondLoadSchedule",
                            {"schedule_name": good_sched_name, "steps": 0})
    for name, data in variants.items():
        (srv.schedules_dir / "stress").mkdir(exist_ok=True)
        (srv.schedules_dir / "stress" / f"{name}.safetensors").write_bytes(data)
        prompt = _replace(sched_base, "SupercondScheduleSigmas", "SupercondLoadSchedule",
                          {"schedule_name": f"stress/{name}.safetensors", "steps": 0})
        check("schedule", name, prompt, sched_canary)

    # LoRAs are read by ComfyUI's own LoraLoader: the server must stay up and say the file is bad.
    variants = hostile.broken_safetensors(good_lora.read_bytes())
    if quick:
        variants = {k: variants[k] for k in ("truncated", "torch_pickle")}
    loader = nodes_of(lora_load, "LoraLoader")[0]
    for name, data in variants.items():
        (srv.loras_dir / "stress").mkdir(exist_ok=True)
        (srv.loras_dir / "stress" / f"{name}.safetensors").write_bytes(data)
        check("lora", name, with_inputs(lora_load, loader, lora_name=f"stress/{name}.safetensors"), lora_load)

    # Resume from a damaged or malicious optimizer state: refused before any step, nothing written.
    states = hostile.broken_states(good_state.read_bytes())
    if quick:
        states = {k: states[k] for k in ("truncated", "malicious_pickle")}
    trainer = nodes_of(lora_graph, "SupercondTrainLoRA")[0]
    for name, data in states.items():
        stem = srv.loras_dir / "stress_state" / name / "lora"
        stem.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(good_lora, stem.with_name("lora_000001.safetensors"))
        stem.with_name("lora_000001.state.pt").write_bytes(data)
        prompt = with_inputs(lora_graph, trainer, filename_prefix=f"stress_state/{name}/lora", resume=True, steps=2)
        check("state", name, prompt, lora_graph)

    # Dataset folders: two good pairs and one hostile item each.
    outside = session.workdir / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(hostile.png(seed=9))
    (outside / "secret.txt").write_text("a caption from outside the input folder")
    items = {
        "symlink_image_out": lambda d: (d / "c.png").symlink_to(outside / "secret.png"),
        "symlink_caption_out": lambda d: ((d / "c.png").write_bytes(hostile.png(seed=3)),
                                          (d / "c.txt").symlink_to(outside / "secret.txt")),
        "symlink_folder_out": lambda d: (d / "more").symlink_to(outside, target_is_directory=True),
        "decompression_bomb": lambda d: ((d / "c.png").write_bytes(hostile.bomb_png()), (d / "c.txt").write_text("x")),
        "truncated_png": lambda d: ((d / "c.png").write_bytes(hostile.png(seed=3)[:300]), (d / "c.txt").write_text("x")),
        "truncated_jpeg": lambda d: ((d / "c.jpg").write_bytes(hostile.jpeg(seed=3)[:200]), (d / "c.txt").write_text("x")),
        "binary_caption": lambda d: ((d / "c.png").write_bytes(hostile.png(seed=3)),
                                     (d / "c.txt").write_bytes(b"\xff\xfe\x00\x9c" * 8)),
        "image_is_text": lambda d: ((d / "c.png").write_bytes(b"not an image at all"), (d / "c.txt").write_text("x")),
        "empty_caption": lambda d: ((d / "c.png").write_bytes(hostile.png(seed=3)), (d / "c.txt").write_bytes(b"")),
    }
    if quick:
        items = {k: items[k] for k in ("symlink_image_out", "decompression_bomb", "truncated_jpeg", "binary_caption")}
    loader = nodes_of(lora_graph, "SupercondLoadDataset")[0]
    for name, make in items.items():
        d = Path(session.workdir / "input" / f"stress_{name}")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for i in range(2):
            (d / f"good{i}.png").write_bytes(hostile.png(seed=i))
            (d / f"good{i}.txt").write_text(f"a good caption {i}")
        make(d)
        check("dataset", name, with_inputs(lora_graph, loader, folder=f"stress_{name}"), lora_graph)
    return tally
