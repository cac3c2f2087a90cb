"""Hostile prompts through ``POST /prompt``: hypothesis draws, for every Supercond node, values at and
beyond each input's edges from the node's ``/object_info`` schema (min/max and one past, 0, -0,
huge ints, NaN/Inf as JSON numbers and as strings, wrong types, empty, very long and unicode
strings, path-like strings, links of the wrong type or to nothing) into a small working graph that
holds the node. For each prompt: the server answers and stays up, every error is a readable sentence,
and the unchanged graph runs again afterwards; at the end, no file appeared outside the folders
prompts may write to."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from .session import MARKER, Outcome, Session, nodes_of, with_inputs

log = logging.getLogger("supercond.stress")

# The cheapest example holding each node (LoadHead and LoadSchedule are made from others below).
BASES = {
    "SupercondCADS": "cads_sampling", "SupercondCEP": "cep_sampling", "SupercondPlotPerturbation": "cep_sampling",
    "SupercondPerturbConditioning": "cep_static", "SupercondEpsilonScaling": "epsilon_scaling_sd3",
    "SupercondNoiseCorrection": "noise_correction", "SupercondScheduleSigmas": "schedule_sigmas_offset_noise",
    "SupercondOffsetNoise": "schedule_sigmas_offset_noise", "SupercondPlotSigmas": "schedule_sigmas_offset_noise",
    "SupercondFitSchedule": "schedule_fit", "SupercondNewHead": "singlepass_guider",
    "SupercondSinglePassGuider": "singlepass_guider", "SupercondSinglePass": "singlepass_ksampler",
    "SupercondTrainLoRA": "lora_train", "SupercondLoadDataset": "lora_train", "SupercondTrainHead": "singlepass_distill",
}
# Smaller settings for the slow bases (the fuzzer changes one input at a time around them).
TWEAKS = {"SupercondTrainHead": {"head": "projection", "lora_rank": 0, "steps": 1},
          "SupercondTrainLoRA": {"steps": 1}, "SupercondFitSchedule": {"teacher_steps": 3, "samples": 1, "steps": 2}}

PATHS = ["", " ", "x" * 100_000, f"../../{MARKER}", f"/tmp/{MARKER}", f"~/{MARKER}", f"a\x00{MARKER}",
         f"C:\\{MARKER}", f"\\\\host\\share\\{MARKER}", f"supercond/../../../{MARKER}", f"ünïcødé 😀 {MARKER}",
         f"$(touch /tmp/{MARKER})", f"`touch /tmp/{MARKER}`", "\n\n", "NaN", "inf", "-1", "null", "{}", "%s%n%x",
         f"supercond/{MARKER}/" + "d/" * 60 + "f", f"{MARKER}\r\n--s 99999 --w 99999 --h 99999"]
NUMBER_TEXTS = ["NaN", "nan", "Infinity", "-Infinity", "inf", "1e999", "-1e999", "0x10", "1_000", " 1 ", "1.5", ""]
WRONG_TYPES = [None, True, False, [], {}, {"a": 1}, [1, 2, 3], "text", 1.5]


@dataclass
class FuzzTally:
    prompts: int = 0
    statuses: Counter = field(default_factory=Counter)
    per_node: Counter = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)
    canary_failures: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)
    crashes: int = 0
    seconds: float = 0.0


def _spec(spec: list) -> tuple[str, dict, list | None]:
    """(type, options, combo choices) of one /object_info input spec, V1 or V3 style."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list):
        return "COMBO", opts, kind
    if kind == "COMBO":
        return "COMBO", opts, list(opts.get("options", []))
    return kind, opts, None


def values(kind: str, opts: dict, choices: list | None) -> st.SearchStrategy:
    """Hostile and edge values for one widget input."""
    strings = st.sampled_from(PATHS) | st.text(max_size=40)
    wrong = st.sampled_from(WRONG_TYPES)
    if kind == "INT":
        lo, hi = int(opts.get("min", -(2 ** 63))), int(opts.get("max", 2 ** 63 - 1))
        edges = [lo, hi, lo - 1, hi + 1, 0, -1, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 30]
        return st.sampled_from(edges) | st.integers(lo, hi) | st.sampled_from([-0.0, 1.5, math.nan, math.inf]) | \
            st.sampled_from(NUMBER_TEXTS) | wrong
    if kind == "FLOAT":
        lo, hi = float(opts.get("min", -1e308)), float(opts.get("max", 1e308))
        step = float(opts.get("step", 0.01) or 0.01)
        edges = [lo, hi, lo - step, hi + step, 0.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
        return st.sampled_from(edges) | st.floats(lo, hi) | st.sampled_from(NUMBER_TEXTS) | wrong
    if kind == "BOOLEAN":
        return st.sampled_from([True, False, "true", "false", 0, 1, 2, None, "yes", [], math.nan])
    if kind == "STRING":
        return strings | wrong | st.sampled_from([0, -1, math.nan])
    if kind == "COMBO":
        return st.sampled_from(choices or [""]) | strings | st.sampled_from([0, -1, None, math.nan, [], {}])
    return wrong


def links(prompt: dict, info: dict, node: str, kind: str) -> st.SearchStrategy:
    """Wrong links for an input of type ``kind``: another type's output, nothing, a bad slot, garbage."""
    other = [[nid, i] for nid, n in prompt.items() if nid != node
             for i, t in enumerate(info.get(n["class_type"], {}).get("output", [])) if t != kind]
    some = [k for k in prompt if k != node][:1] or ["1"]
    bad = [["99999", 0], [some[0], 9], [some[0], -1], [some[0]], [int(some[0]), 0], [some[0], "0"], [None, 0],
           "1", 0, None, [], {"a": 1}]
    return (st.sampled_from(other) if other else st.nothing()) | st.sampled_from(bad)


def bases(session: Session) -> dict[str, dict]:
    """The working graph for each node: an example, made small; the loaders use files trained first."""
    out = {}
    for node, name in BASES.items():
        prompt = session.example(name, max_steps=2)
        for nid in nodes_of(prompt, node):
            prompt[nid]["inputs"].update({k: v for k, v in TWEAKS.get(node, {}).items() if k in prompt[nid]["inputs"]})
        out[node] = prompt
    for node, trainer in (("SupercondLoadHead", "SupercondTrainHead"), ("SupercondLoadSchedule", "SupercondFitSchedule")):
        made = session.run(out[trainer])
        if made.status != "success":
            raise RuntimeError(f"making a file for {node} failed: {made.messages}")
    session.info = session.client.object_info()
    head = session.info["SupercondLoadHead"]["input"]["required"]["head_name"]
    head_files = _spec(head)[2]
    out["SupercondLoadHead"] = _replace(out["SupercondSinglePass"], "SupercondNewHead", "SupercondLoadHead",
                                        {"head_name": head_files[0]})
    sched = session.info["SupercondLoadSchedule"]["input"]["required"]["schedule_name"]
    out["SupercondLoadSchedule"] = _replace(out["SupercondScheduleSigmas"], "SupercondScheduleSigmas",
                                            "SupercondLoadSchedule", {"schedule_name": _spec(sched)[2][0], "steps": 0})
    return out


def _replace(prompt: dict, old: str, new: str, inputs: dict) -> dict:
    out = copy.deepcopy(prompt)
    nid = nodes_of(out, old)[0]
    out[nid] = {"class_type": new, "inputs": {"model": out[nid]["inputs"]["model"], **inputs}}
    return out


def fuzz(session: Session, prompts: int, rng_seed: int = 0, deadline: float = 20.0) -> FuzzTally:
    """``prompts`` hostile prompts spread over every Supercond node, with a valid run after each."""
    tally = FuzzTally()
    graphs = bases(session)
    order = sorted(graphs)
    before = session.files()
    started = time.monotonic()

    per_node = max(1, -(-prompts // len(order)))
    for target in order:  # one hypothesis run per node: even coverage, and each run's draws stay consistent
        _fuzz_node(session, tally, target, graphs[target], per_node, rng_seed, deadline)
    tally.seconds = time.monotonic() - started
    tally.crashes = session.crashes
    tally.misplaced = [str(p) for p in session.misplaced(before, session.files())]
    return tally


def _fuzz_node(session: Session, tally: FuzzTally, target: str, base: dict, count: int, rng_seed: int,
               deadline: float) -> None:
    schema = session.info[target]["input"]
    specs = {k: v for sec in ("required", "optional") for k, v in schema.get(sec, {}).items()}

    @seed(rng_seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        nid = data.draw(st.sampled_from(nodes_of(base, target)))
        names = sorted(base[nid]["inputs"]) + sorted(set(specs) - set(base[nid]["inputs"]))
        picked = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        changes = {}
        for name in picked:
            kind, opts, choices = _spec(specs[name]) if name in specs else ("?", {}, None)
            if kind in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"):
                changes[name] = data.draw(values(kind, opts, choices))
            else:
                changes[name] = data.draw(links(base, session.info, nid, kind))
        outcome = session.run(with_inputs(base, nid, **changes), deadline=deadline)
        _record(tally, target, outcome, f"{target} {changes!r:.200}")
        if outcome.status != "rejected":  # the same graph, unchanged, must run (again)
            canary = session.run(base, deadline=600)
            if canary.status != "success":
                tally.canary_failures.append(f"{target} after {changes!r:.200}: {canary.status} {canary.messages}")
        tally.prompts += 1
        if tally.prompts % 100 == 0:
            log.info("stress fuzz: %d prompts, %s", tally.prompts, dict(tally.statuses))

    one()


def _record(tally: FuzzTally, target: str, outcome: Outcome, what: str) -> None:
    tally.statuses[outcome.status] += 1
    tally.per_node[target] += 1
    for m in outcome.unreadable:
        tally.unreadable.append(f"{what} -> {outcome.status} {outcome.node_type}: {m!r:.300}")
    if outcome.status in ("stuck", "crashed"):
        tally.stuck.append(f"{what} -> {outcome.status}: {outcome.messages}")
