"""Start-up of JAX's multi-controller runtime: one process per host, every process runs the
same command (SPEC §5, §8).

Entry points call `initialize()` first, before anything touches devices. Where the job
runs decides how the processes find each other, first match wins:

    flags / FLAMINGO_* variables   --coordinator_address HOST:PORT --num_processes N
                                   --process_id I  (or FLAMINGO_COORDINATOR,
                                   FLAMINGO_NUM_PROCESSES, FLAMINGO_PROCESS_ID)
    SLURM (srun), several tasks    coordinator: first node of the step's node list, port
                                   FLAMINGO_COORDINATOR_PORT (default from the job id);
                                   SLURM_PROCID of SLURM_NTASKS
    Cloud TPU VM slice, GKE TPU    jax.distributed.initialize() finds everything itself
    anything else                  one process: nothing to do

After it, `jax.devices()` lists the devices of every process, so every process builds the
same global mesh; each reads its own data shard (`jax.process_index()` of
`jax.process_count()`) and only process 0 writes logs and metrics.

Processes on CPU exchange data with gloo. When the coordinator is a loopback address (the
N-processes-on-one-machine case of launch/local.sh and the tests), the coordinator service
and gloo listen on 127.0.0.1 only.
"""

import dataclasses
import importlib.util
import ipaddress
import json
import os
import re
from typing import Callable, Mapping

from absl import flags, logging

ENV_COORDINATOR = "FLAMINGO_COORDINATOR"
ENV_NUM_PROCESSES = "FLAMINGO_NUM_PROCESSES"
ENV_PROCESS_ID = "FLAMINGO_PROCESS_ID"
ENV_COORDINATOR_PORT = "FLAMINGO_COORDINATOR_PORT"
# Environment variables that only exist on Cloud TPU VMs and GKE TPU pods.
TPU_ENV_MARKERS = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS")
TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")
SLURM_PORT_BASE = 20000  # SLURM coordinator port: base + job id mod 10000


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins the job. kind: 'single', 'explicit', 'slurm' or 'tpu'."""

    kind: str
    coordinator_address: str | None = None  # HOST:PORT; None for 'single' and 'tpu'
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None  # None: every local device

    @property
    def loopback(self) -> bool:
        return self.coordinator_address is not None and _is_loopback(
            split_address(self.coordinator_address)[0])


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port), or a ValueError saying what is wrong."""
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", address or "")
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"coordinator address {address!r} is not HOST:PORT with a port in "
                         "1..65535; pass e.g. --coordinator_address=10.0.0.2:12345")
    return match.group(1), int(match.group(2))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: 'gpu[03-04,9],x' -> 'gpu03',
    'n-[1-8]-ib' -> 'n-1-ib'."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]+)\])?", nodelist)
    if not nodelist or not match or not match.group(0):
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    rest = nodelist[match.end():].split(",", 1)[0]
    suffix = first_slurm_host(rest) if rest else ""
    return prefix + re.split(r"[,-]", ranges)[0] + suffix


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _explicit(coordinator: str | None, num_processes, process_id, source: str) -> Cluster:
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"{source}: {missing} missing; a multi-process job needs all of the "
                         "coordinator address, the number of processes and this process's id")
    num_processes = _int(num_processes, f"{source} num_processes")
    process_id = _int(process_id, f"{source} process_id")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"{source}: process_id={process_id} of num_processes={num_processes}; "
                         "need num_processes >= 1 and 0 <= process_id < num_processes")
    split_address(coordinator)
    if num_processes == 1:
        return Cluster("single")
    return Cluster("explicit", coordinator, num_processes, process_id)


def _slurm(env: Mapping[str, str]) -> Cluster:
    num_processes = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    process_id = _int(env["SLURM_PROCID"], "SLURM_PROCID")
    if num_processes == 1:
        return Cluster("single")
    nodelist = env["SLURM_STEP_NODELIST"]  # the nodes of this srun step
    if ENV_COORDINATOR_PORT in env:
        port = _int(env[ENV_COORDINATOR_PORT], ENV_COORDINATOR_PORT)
    else:
        port = SLURM_PORT_BASE + _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 10000
    # One process per GPU (several tasks on a node) sees only its own GPU; one process per
    # node sees them all.
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE", "1")
    local = None
    if _int(tasks_per_node.split("(")[0].split(",")[0], "SLURM tasks per node") > 1:
        local = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
    return Cluster("slurm", f"{first_slurm_host(nodelist)}:{port}", num_processes, process_id,
                   local)


def _on_cloud_tpu(env: Mapping[str, str], exists: Callable[[str], bool]) -> bool:
    if any(env.get(k) for k in TPU_ENV_MARKERS):
        return True
    return (any(exists(f) for f in TPU_DEVICE_FILES)
            and importlib.util.find_spec("libtpu") is not None)


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, env: Mapping[str, str] | None = None,
           exists: Callable[[str], bool] = os.path.exists) -> Cluster:
    """Which kind of job this process belongs to; touches no device (module docstring)."""
    env = os.environ if env is None else env
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given):
        return _explicit(*given, source="flags --coordinator_address/--num_processes/"
                                        "--process_id")
    from_env = tuple(env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
    if any(v is not None for v in from_env):
        return _explicit(*from_env, source=f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/"
                                           f"{ENV_PROCESS_ID}")
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                              "SLURM_PROCID")):  # a task started by srun
        return _slurm(env)
    if _on_cloud_tpu(env, exists):
        return Cluster("tpu")
    return Cluster("single")


def _use_loopback_gloo() -> None:
    """CPU collectives over gloo bound to 127.0.0.1 (gloo otherwise binds the address the
    machine's hostname resolves to)."""
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    def cpu_client():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=jax_distributed.global_state.client, hostname="127.0.0.1")
        return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory("cpu", cpu_client, priority=0, fail_quietly=False)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> Cluster:
    """Joins this process to the job (see the module docstring); idempotent."""
    import jax

    cluster = detect(coordinator_address, num_processes, process_id)
    if cluster.kind == "single" or jax.distributed.is_initialized():
        return cluster
    if cluster.kind == "tpu":
        jax.distributed.initialize()
    else:
        # Only read by the CPU client; GPU processes use NCCL.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        bind = None
        if cluster.loopback:
            bind = f"127.0.0.1:{split_address(cluster.coordinator_address)[1]}"
            _use_loopback_gloo()
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes, process_id=cluster.process_id,
            local_device_ids=cluster.local_device_ids, cluster_detection_method="deactivate",
            initialization_timeout=timeout_s, coordinator_bind_address=bind)
    logging.info("process %d of %d (%s), %d local and %d global devices", jax.process_index(),
                 jax.process_count(), cluster.kind, jax.local_device_count(), jax.device_count())
    return cluster


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process of the job reaches `name`. It goes through the coordinator,
    not the devices: CPU collectives (gloo) give up when processes reach a new collective
    more than 30 s apart, e.g. when one is still building its input pipeline."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def define_flags() -> Callable[[], dict]:
    """Defines the start-up flags of an entry point; the returned function gives their
    values as `initialize` keyword arguments once flags are parsed."""
    address = flags.DEFINE_string(
        "coordinator_address", None,
        f"HOST:PORT of process 0's coordinator (else ${ENV_COORDINATOR}, SLURM, or TPU "
        "auto-detection).")
    count = flags.DEFINE_integer("num_processes", None,
                                 f"Processes in the job (else ${ENV_NUM_PROCESSES}).")
    index = flags.DEFINE_integer("process_id", None,
                                 f"This process's index, 0-based (else ${ENV_PROCESS_ID}).")
    return lambda: dict(coordinator_address=address.value, num_processes=count.value,
                        process_id=index.value)


# ---- Input positions of every process ------------------------------------------------
# Each process reads its own shard, so each has its own input position. A checkpoint holds
# all of them: {"num_processes": n, "processes": [state of process 0, ..., n - 1]}.


def gather_input_states(state: dict) -> dict:
    """This process's JSON-able input state -> every process's, on every process
    (collective: all processes call it together)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return {"num_processes": 1, "processes": [state]}
    blob = np.frombuffer(json.dumps(state, sort_keys=True).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))  # [n, max size]
    return {"num_processes": len(sizes),
            "processes": [json.loads(bytes(b[:s]).decode("utf-8")) for b, s in zip(blobs, sizes)]}


def _carry_over(states: list[dict], index: int, count: int) -> dict:
    """One process's input state when the process count changed from len(states) to
    `count`: every process skips an equal share of the records all processes had consumed.
    Exact when records are dealt round-robin to processes and not shuffled; otherwise the
    run goes on with as many records consumed, not the same ones."""
    first = states[0]
    if first.get("mode") == "per_task":
        return {"mode": "per_task", "tasks": {
            name: _carry_over([s["tasks"][name] for s in states], index, count)
            for name in first["tasks"]}}
    out = {**first, "shard": [index, count],
           # Counts of bad inputs stay whole once, on process 0.
           "bad_input": _sum_counts([s["bad_input"] for s in states]) if index == 0 else {}}
    if isinstance(first["next_index"], list):  # sample mode: one position per task
        out["next_index"] = [sum(p) // count for p in zip(*(s["next_index"] for s in states))]
        out["choices_made"] = sum(s["choices_made"] for s in states) // count
    else:
        out["next_index"] = sum(s["next_index"] for s in states) // count
    return out


def _sum_counts(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def input_state_for_process(saved: dict | None, index: int, count: int) -> dict | None:
    """This process's input state from a checkpoint's `gather_input_states` record, also
    when the checkpoint was written by a different number of processes."""
    if saved is None:
        return None
    if "processes" not in saved:  # written by one process without the gather
        saved = {"num_processes": 1, "processes": [saved]}
    states = saved["processes"]
    if len(states) == count:
        return states[index]
    logging.warning(
        "the checkpoint's input positions are from %d processes, this job has %d: each "
        "process skips an equal share of the records consumed so far (the same examples "
        "only when records are dealt round-robin without shuffling)", len(states), count)
    return _carry_over(states, index, count)
