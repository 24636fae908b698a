"""Compile the real train step and sampler for a TPU topology on a CPU machine (`flowtok aot`).

    flowtok aot --config configs/flowtok_xl.py --topology v5p:2x2x2
    flowtok aot --config configs/flowtok_h.py:remat=full --topology v5p:4x4x2 --what train

Needs libtpu (the `tpu` extra: `pip install 'jax[tpu]==0.10.2'`); `JAX_PLATFORMS=cpu` keeps the
rest of JAX on the CPU. `jax.experimental.topologies` describes the slice's chips without owning
them, the mesh of the config is laid over them, and XLA's TPU compiler partitions and compiles
the programs exactly as on the pod. What comes back is per chip: the memory XLA reserves
(arguments, outputs, temporaries, code; donated outputs reuse their argument buffers) against the
chip's HBM, and XLA's FLOP count (with remat recomputation) beside the analytic model FLOPs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Optional, Sequence

import ml_collections

from flowtok_jax import flops as _flops
from flowtok_jax.errors import UserError

_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """HBM and bf16 peak of one chip; `cores` TensorCores share that HBM."""
  hbm_gib: float
  cores: int
  peak_flops: float


# Public Cloud TPU figures (bf16 dense peak; peers_and_perf §2.4).
CHIPS = {
    "v4": Chip(32, 2, 275e12),
    "v5e": Chip(16, 1, 197e12),
    "v5p": Chip(95, 2, 459e12),
    "v6e": Chip(32, 1, 918e12),
}


def chip_of(topology: str) -> Chip:
  kind = topology.split(":", 1)[0]
  if kind not in CHIPS:
    raise UserError(f"topology {topology!r}: unknown TPU generation {kind!r} "
                    f"(known: {', '.join(CHIPS)}; e.g. v5p:2x2x1, v5e:2x2)")
  return CHIPS[kind]


# Cloud TPU accelerator-type names: (prefix, devices per chip in the name's count).
_ACCELERATOR_NAMES = {"v4": ("v4", 2), "v5e": ("v5litepod", 1), "v5p": ("v5p", 2),
                      "v6e": ("v6e", 1)}


def accelerator_type(topology: str) -> str | None:
  """'v5p:2x2x1' -> 'v5p-8' (the name a TPU VM of that slice reports); None if unreadable."""
  kind, _, dims = topology.partition(":")
  try:
    chips = math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    return None
  prefix, per_chip = _ACCELERATOR_NAMES.get(kind, (kind, 1))
  return f"{prefix}-{chips * per_chip}"


def topology_devices(topology: str):
  """The abstract devices of `topology` (e.g. 'v5p:2x2x2'); UserError without libtpu."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise UserError("flowtok aot needs libtpu: pip install 'jax[tpu]==0.10.2' "
                    "(the `tpu` extra)") from e
  chip_of(topology)
  # libtpu looks for a TPU VM's metadata first; on a CPU machine that only produces warnings.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # No chip is opened, so several compiling processes (tests, sweeps) may share libtpu; without
  # this the second one fails on libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    # Not a TPU VM: without these libtpu prints "could not determine TPU accelerator type" and
    # "unexpected worker hostname" errors (the compile is the same either way).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if accelerator_type(topology):
      os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot describe TPU topology {topology!r}: {str(e).splitlines()[0]}") from e


def memory_report(compiled, hbm_bytes: float) -> dict:
  """Per-device memory of a compiled program (bytes) and whether it fits `hbm_bytes`."""
  mem = compiled.memory_analysis()
  get = lambda f: int(getattr(mem, f, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"),
         "output_bytes": get("output_size_in_bytes"),
         "alias_bytes": get("alias_size_in_bytes"),
         "temp_bytes": get("temp_size_in_bytes"),
         "code_bytes": get("generated_code_size_in_bytes")}
  # Donated outputs live in their arguments' buffers: count them once.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["code_bytes"])
  out["hbm_bytes"] = int(hbm_bytes)
  out["fits"] = out["total_bytes"] <= hbm_bytes
  return out


def compile_program(program, num_devices: int, hbm_per_device: float,
                    peak_per_device: float) -> dict:
  """Lowers and compiles a `programs.Program`; returns its per-device report."""
  t = time.perf_counter()
  lowered = program.lower()
  t_lower = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t
  out = {"program": program.name, "examples": program.examples,
         "mesh": dict(program.mesh.shape), "lower_s": round(t_lower, 1),
         "compile_s": round(t_compile, 1)}
  out.update(memory_report(compiled, hbm_per_device))
  xla = _flops.xla_flops(compiled)
  out["xla_flops_per_device"] = xla
  # XLA's cost analysis counts a while-loop body once, whatever its trip count: the sampler's
  # ODE loop, and loops XLA's TPU passes create themselves, make its count low.
  try:
    out["hlo_while_loops"] = compiled.as_text().count(" while(")
  except Exception:  # pylint: disable=broad-except
    out["hlo_while_loops"] = None
  out["analytic_flops_per_device"] = program.flops / num_devices if program.flops else None
  if program.flops:
    # Seconds per call at 50 % MFU of the chips' bf16 peak: a yardstick for capacity planning.
    out["seconds_at_50pct_mfu"] = round(2 * program.flops / (num_devices * peak_per_device), 4)
  return out


def run(config: ml_collections.ConfigDict, topology: str, *, what: Sequence[str] = ("train",
                                                                                    "sample"),
        batch_size: Optional[int] = None, sample_batch: Optional[int] = None,
        steps: Optional[int] = None, stage: Optional[str] = None) -> dict:
  """Compiles the train step and/or the T2I sampler of `config` for `topology`.

  Args:
    config: full config (mesh.shape is laid over the topology's devices).
    topology: e.g. 'v5p:2x2x1' (4 chips), 'v5p:2x2x2' (8 chips, 2 hosts), 'v5e:4x4'.
    what: 'train', 'sample' (text -> image) and/or 'caption' (image -> text).
    batch_size: global train batch (default config.train.batch_size).
    sample_batch: global sampling batch (default config.sample.batch_size).
    steps: sampling steps (default config.sample.steps).
    stage: train stage (default config.train.stage).
  Returns:
    {'topology', 'chip', 'devices', 'hosts', 'hbm_per_device_gib', 'programs': [report, ...]}.
  """
  from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
  from flowtok_jax.tools import programs  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(what) - {"train", "sample", "caption"})
  if unknown:
    raise UserError(f"--what {unknown}: choose from train, sample, caption")
  chip = chip_of(topology)
  devices = topology_devices(topology)
  cores = getattr(devices[0], "num_cores", chip.cores) or chip.cores
  share = min(cores, chip.cores) / chip.cores  # v4 topologies list each TensorCore as a device.
  hbm, peak = chip.hbm_gib * _GIB * share, chip.peak_flops * share
  hosts = len({d.process_index for d in devices})
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  out = {"topology": topology, "devices": len(devices), "hosts": hosts,
         "hbm_per_device_gib": round(hbm / _GIB, 2), "programs": []}
  for name in what:
    if name == "train":
      program = programs.train_program(config, mesh, stage_name=stage, batch_size=batch_size,
                                       process_count=hosts)
    else:
      program = programs.sample_program(config, mesh,
                                        direction="t2i" if name == "sample" else "i2t",
                                        batch_size=sample_batch, steps=steps)
    logging.info("compiling %s for %s (mesh %s)", program.name, topology, dict(mesh.shape))
    out["programs"].append(compile_program(program, len(devices), hbm, peak))
  return out


def summary(result: dict) -> str:
  """Human-readable lines for `flowtok aot`."""
  lines = [f"{result['topology']}: {result['devices']} devices on {result['hosts']} host(s), "
           f"{result['hbm_per_device_gib']} GiB HBM per device"]
  for p in result["programs"]:
    g = lambda k, p=p: p[k] / _GIB
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines.append(
        f"  {p['program']} (batch {p['examples']}, mesh {p['mesh']}): compiled in "
        f"{p['compile_s']} s")
    lines.append(
        f"    per device: arguments {g('argument_bytes'):.2f} GiB, outputs {g('output_bytes'):.2f}"
        f" GiB (aliased {g('alias_bytes'):.2f}), temporaries {g('temp_bytes'):.2f} GiB, code "
        f"{g('code_bytes'):.3f} GiB -> {g('total_bytes'):.2f} of {g('hbm_bytes'):.1f} GiB: "
        f"{verdict}")
    if p["xla_flops_per_device"]:
      msg = f"    FLOPs per device: XLA {p['xla_flops_per_device']:.3e}"
      if p["analytic_flops_per_device"]:
        ratio = p["xla_flops_per_device"] / p["analytic_flops_per_device"]
        msg += f", analytic {p['analytic_flops_per_device']:.3e} (XLA / analytic {ratio:.2f})"
      if p.get("hlo_while_loops"):
        msg += f"; {p['hlo_while_loops']} while loop(s), counted once by XLA"
      lines.append(msg)
  return "\n".join(lines)
