"""The experiment's training step compiled for its mesh and projected onto a real slice
(``moe pod plan``, the run report's pod section).

The hardware model (``moe.pod``) knows nothing of models or configs: it takes a compiled
program and a slice (``pod.cost.project``). This module compiles the experiment's step and
asks it twice: for this CPU host (calibrated; the accuracy check against the measured time)
and for the configured slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from moe.config import Experiment
from moe.pod.calibrate import calibrate_cpu
from moe.pod.cost import project
from moe.pod.topology import PodSlice, get_slice
from moe.training.sharding import Placement
from moe.training.step import make_train_step


def _cpu_slice(exp: Experiment, devices: int) -> PodSlice:
    chip = calibrate_cpu(Path(exp.data.cache_dir) / "cpu_calibration.json")
    return get_slice("cpu", devices).with_chip(chip)


def project_train_step(exp: Experiment, compiled: Any) -> dict[str, Any]:
    """Projection of one compiled train step: on this CPU host (to check the cost model against
    the measured time) and on the configured slice."""
    devices = jax.device_count()
    here = project(compiled, _cpu_slice(exp, devices))
    out: dict[str, Any] = {"projected_cpu_step_ms": 1000 * here.total_s}
    if exp.pod.topology == "cpu":
        target = here
        out["target"] = f"cpu:{devices}"
    else:
        pod = get_slice(exp.pod.topology, exp.pod.slice)
        target = project(compiled, pod)
        out["target"] = pod.name
    out["projected_step_ms"] = 1000 * target.total_s
    out["projected_breakdown"] = {
        "compute_ms": 1000 * target.compute_s,
        "memory_ms": 1000 * target.memory_s,
        "collectives_ms": 1000 * target.collective_s,
        **{k: v for k, v in target.breakdown.items()},
    }
    return out


def pod_summary(
    exp: Experiment, placement: Placement, compiled: Any, measured_step_ms: float | None
) -> dict[str, Any]:
    """The train summary's pod section: measured step time here and the projections."""
    out = {
        "topology": exp.pod.topology,
        "slice": exp.pod.slice or "1",
        "devices": int(placement.mesh.size),
        "processes": jax.process_count(),
        "mesh": {k: int(v) for k, v in placement.mesh.shape.items()},
        "measured_step_ms": measured_step_ms,
    }
    out.update(project_train_step(exp, compiled))
    return out


def scale_to_slice(exp: Experiment, slice_text: str, keep: tuple[str, ...] = ()):
    """``(overrides, note)`` that project ``exp`` onto the slice ``topology:shape`` (``moe pod
    plan --slice``): the slice's chips go to the data axis (the expert and model axes stay as
    configured, so each device keeps its experts) and the global batch (train and eval) grows
    with it, keeping the rows per device; ``note`` says so. ``keep`` names keys the user set
    (``pod.mesh``, ``train.batch_size``, ``eval.batch_size``), left as they are. Raises
    ValueError (one line) when the slice cannot hold the configured expert x model axes."""
    topology, _, shape = slice_text.partition(":")
    chips = get_slice(topology, shape or None).num_chips
    target = [f"pod.topology={topology}", f"pod.slice={shape or 'null'}", "pod.processes=1"]
    mesh = dict(exp.mesh_shape)
    if "pod.mesh" in keep:
        return target, f"projecting onto {slice_text} ({chips} chips) with the given pod.mesh"
    others = 1
    for axis, size in mesh.items():
        others *= size if axis != "data" else 1
    if chips % others:
        raise ValueError(
            f"{slice_text} has {chips} chips, not a multiple of the mesh's expert x model axes "
            f"({others}); set pod.mesh for it, e.g. 'pod.mesh={{data: -1, expert: 1}}'"
        )
    data = chips // others
    axes = ", ".join(f"{k}: {data if k == 'data' else v}" for k, v in mesh.items())
    out = [*target, f"pod.mesh={{{axes}}}"]
    note = f"projecting onto {slice_text} ({chips} chips): data axis {mesh['data']} -> {data}"
    note += f" ({', '.join(f'{k} {v}' for k, v in mesh.items() if k != 'data')} kept)"
    batches = (("train.batch_size", exp.train.batch_size), ("eval.batch_size", exp.eval.batch_size))
    for key, size in batches:
        scaled = size * data // mesh["data"]
        if key in keep or scaled == size or size * data % mesh["data"]:
            continue
        out.append(f"{key}={scaled}")
        if key == "train.batch_size":
            note += f", global batch {size} -> {scaled} (the same rows per device)"
    return out, note + "; set pod.mesh / train.batch_size to choose otherwise"


def compile_train_step(exp: Experiment):
    """The experiment's train step compiled (not run) for this process's devices."""
    placement = Placement.for_experiment(exp)
    b, ls, lt = exp.train.batch_size, exp.model.max_source_length, exp.model.max_target_length
    shapes = {"src": (b, ls), "tgt_in": (b, lt), "tgt_out": (b, lt), "task": (b,)}
    step = placement.jit_train_step(make_train_step(exp, placement.graphdef, placement.optimizer))
    return step.lower(
        placement.abstract_state, placement.abstract_batch(shapes), jax.random.key(0)
    ).compile()


def plan(exp: Experiment) -> str:
    """A table: the projected step time of ``exp`` on its slice, and its parts."""
    proj = project_train_step(exp, compile_train_step(exp))
    b = proj["projected_breakdown"]
    rows = [
        ("slice", proj["target"]),
        ("mesh", str(exp.mesh_shape)),
        ("global batch", str(exp.train.batch_size)),
        ("projected step (ms)", f"{proj['projected_step_ms']:.3f}"),
        ("  compute (ms)", f"{b['compute_ms']:.3f}"),
        ("  memory (ms)", f"{b['memory_ms']:.3f}"),
        ("  collectives (ms)", f"{b['collectives_ms']:.3f}"),
        ("FLOPs per device", f"{b.get('flops', 0):.3e}"),
    ]
    rows += [(f"  {k}", f"{v:.3e}") for k, v in sorted(b.items()) if k.endswith("_bytes")]
    rows += [
        (f"  {k} (ms)", f"{1000 * v:.3f}")
        for k, v in sorted(b.items())
        if k.endswith("_s") and k != "kernels_s"
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
