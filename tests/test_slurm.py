"""The project's sbatch scripts on a real SLURM: a throw-away 2-node cluster on loopback
(launch/local-slurm/start.sh; needs root and apt, as in CI), CPU processes joined over gloo.

- a 2-node job trains to the expected step, with one process per node;
- a job that gets SLURM's advance warning (USR1) mid-training checkpoints, requeues itself, resumes and
  ends with the same step count and the same parameters as the uninterrupted job;
- a job whose process on one node dies (kill -9) ends, failed, within a bounded time instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_dejpeg.config import to_yaml
from dist_dejpeg.train import checkpoint as ckpt

from test_trainer import tiny

ROOT = Path(__file__).parents[1]
LOCAL_SLURM = ROOT / "launch" / "local-slurm"
pytestmark = pytest.mark.slow

STEPS = {"gen": 16, "critic": 2, "gan": 4}


def _have_cluster() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True)
    return done.returncode == 0 and "idle" in done.stdout


@pytest.fixture(scope="module")
def slurm():
    """An idle 2-node cluster: the one already running, else a throw-away one started (and stopped) here."""
    if _have_cluster():
        yield
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs a running SLURM, or root and apt to start one (launch/local-slurm/start.sh)")
    started = subprocess.run([str(LOCAL_SLURM / "start.sh")], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield
    finally:
        subprocess.run([str(LOCAL_SLURM / "stop.sh")], capture_output=True, timeout=120)


def sbatch(script: str, config: Path, *args: str) -> int:
    # one OpenMP thread per training process: the test nodes share this machine's cores (two jobs of two nodes
    # at once), and spinning OpenMP threads of several processes on the same cores slow every one of them down
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    # the scripts ask for 16 CPUs per task, as on a GPU node; the test nodes have nproc each
    done = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={os.cpu_count()}",
                           f"--output={config.parent}/%x-%j.out", *args, str(ROOT / "launch" / "slurm" / script), str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(";")[0])


def job_field(job: int, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True).stdout
    found = re.search(rf"\b{field}=(\S+)", out)
    return found.group(1) if found else ""


def wait_for_end(job: int, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job, "JobState")
        reason = job_field(job, "Reason")
        if state == "PENDING" and reason not in ("None", "Priority", "Resources", "BeginTime", ""):
            subprocess.run(["scancel", str(job)])
            raise AssertionError(f"job {job} cannot start: {reason}")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)])
    raise AssertionError(f"job {job} still {job_field(job, 'JobState')} after {timeout} s")


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted((run_dir / "logs").glob("*.log")))


def write_config(tmp_path: Path, name: str, shards: Path, *over: str) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    steps = [f"train.phases.{k}.steps={v}" for k, v in STEPS.items()]
    config = tmp_path / f"{name}.yaml"
    config.write_text(to_yaml(tiny(run_dir, shards, *steps, "train.ckpt_every=2", "train.keep_last=20",
                                   "data.val_max_images=6", *over)))
    return config, run_dir


@pytest.fixture(scope="module")
def jobs(slurm, sample_shards, tmp_path_factory):
    """Two jobs of the same config, submitted at once (the cluster oversubscribes its cores); the second one
    gets SLURM's advance warning after its second checkpoint (step 4 of 22), as `--signal=B:USR1@120` would
    send it before the time limit."""
    tmp = tmp_path_factory.mktemp("slurm")
    plain = write_config(tmp, "plain", sample_shards)
    preempted = write_config(tmp, "preempted", sample_shards)
    out = {"plain": (sbatch("train_multi_node.sbatch", plain[0]), plain[1]),
           "preempted": (sbatch("train_multi_node.sbatch", preempted[0]), preempted[1])}
    job, run_dir = out["preempted"]
    deadline = time.time() + 400
    while len(ckpt.list_checkpoints(run_dir)) < 2:
        assert job_field(job, "JobState") in ("PENDING", "RUNNING"), logs(run_dir)
        assert time.time() < deadline, logs(run_dir)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)
    return out


def final_weights(run_dir: Path) -> tuple[str, dict]:
    latest = ckpt.latest_checkpoint(run_dir)
    return latest.name, {n: load_file(str(latest / n)) for n in ("model.safetensors", "model_1.safetensors")}


def test_two_node_job_trains_to_the_expected_step(jobs):
    job, run_dir = jobs["plain"]
    assert wait_for_end(job, 600) == "COMPLETED", logs(run_dir)
    total = sum(STEPS.values())
    assert json.loads((run_dir / "metrics.json").read_text())["meta"]["processes"] == 2, logs(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest.name == f"step-{total:08d}"
    # one process per node: two ranks saved their RNG and data-stream state
    assert sorted(p.name for p in latest.glob("loader_*.json")) == ["loader_0.json", "loader_1.json"]
    assert {p.name for p in (run_dir / "logs").glob("train-*.log")} == {f"train-{job}-node0.log",
                                                                       f"train-{job}-node1.log"}


def test_usr1_checkpoints_requeues_and_ends_like_the_uninterrupted_job(jobs):
    job, run_dir = jobs["preempted"]
    deadline = time.time() + 600
    while job_field(job, "Restarts") in ("", "0"):
        assert job_field(job, "JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), logs(run_dir)
        assert time.time() < deadline, logs(run_dir)
        time.sleep(0.5)
    assert wait_for_end(job, 600) == "COMPLETED", logs(run_dir)
    text = logs(run_dir)
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text and f"job {job} restart 1" in text, text
    assert re.search(r"stopped by SIGTERM after step \d+", text), text
    assert "train.auto_resume: continuing the run" in text, text

    plain_job, plain_dir = jobs["plain"]
    assert wait_for_end(plain_job, 600) == "COMPLETED", logs(plain_dir)
    name_a, a = final_weights(plain_dir)
    name_b, b = final_weights(run_dir)
    assert name_a == name_b == f"step-{sum(STEPS.values()):08d}"
    for file in a:
        diff = [k for k in a[file] if not torch.equal(a[file][k], b[file][k])]
        assert not diff, f"{file}: {diff[:5]}"


def _worker_pids(config: Path) -> dict[str, int]:
    """node name -> pid of a training worker (started by the launcher, so it has LOCAL_RANK) of ``config``."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            if str(config).encode() not in cmdline or b"accelerate.commands.launch" in cmdline:
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"LOCAL_RANK" in env:
            found[env.get(b"SLURMD_NODENAME", b"?").decode()] = int(proc.name)
    return found


def test_a_dead_rank_ends_the_job_instead_of_hanging(slurm, sample_shards, tmp_path):
    config, run_dir = write_config(tmp_path, "doomed", sample_shards, "train.phases.gen.steps=100000",
                                   "train.dist_timeout_s=60")
    job = sbatch("train_multi_node.sbatch", config)
    deadline = time.time() + 400
    while not ckpt.list_checkpoints(run_dir):  # training is under way on both nodes
        assert job_field(job, "JobState") in ("PENDING", "RUNNING"), logs(run_dir)
        assert time.time() < deadline, logs(run_dir)
        time.sleep(0.2)
    pids = _worker_pids(config)
    assert "node2" in pids, pids
    os.kill(pids["node2"], signal.SIGKILL)
    killed = time.time()
    state = wait_for_end(job, 120)
    assert state in ("FAILED", "CANCELLED"), state
    assert time.time() - killed < 90, f"the job took {time.time() - killed:.0f} s to end after the kill"


def test_the_launcher_waits_for_the_checkpoint_until_slurm_kills(tmp_path):
    """No cluster needed: common.sh's setup as the batch shell runs it. scancel's TERM reaches `accelerate launch`
    too, and torch's launcher SIGKILLs the ranks 30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): shorter than the
    stop a rank may take (train.preempt_budget_s), so the checkpoint would be lost; it must wait past the budget,
    up to SLURM's --signal lead time."""
    from dist_dejpeg.config import load_config

    script = (ROOT / "launch" / "slurm" / "train_multi_node.sbatch").read_text()
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", script).group(1))
    budget = load_config(ROOT / "configs" / "div2k.yaml", []).train.preempt_budget_s
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCH_ELASTIC"))}
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", PYTHON=sys.executable)
    run_dir = tmp_path / "run"
    shell = ('CONFIG=configs/div2k.yaml; OVERRIDES=("train.run_dir=$1"); source launch/slurm/common.sh; dd_setup; '
             'echo "timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"')
    done = subprocess.run(["bash", "-c", shell, "bash", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = re.search(r"timeout=(\d+)", (run_dir / "logs" / "job-7.log").read_text())
    assert found and budget < int(found.group(1)) < lead, found


def test_the_rendezvous_port_is_the_next_free_one_where_another_job_holds_it():
    """Two jobs whose ids are 14000 apart start from the same port on a shared first node: the second takes the
    next port this node can bind (wrapping within 15000-28999), not a rendezvous that fails on a port in use."""
    import socket

    def port_of(start: int) -> int:
        shell = f'PYTHON={sys.executable}; source launch/slurm/common.sh; dd_free_port {start}'
        done = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    with socket.socket() as held:
        for start in range(15000 + os.getpid() % 13000, 29000):  # one this machine has free, held as a job's store
            try:
                held.bind(("", start))
                break
            except OSError:
                continue
        held.listen()
        assert port_of(start) > start
    assert port_of(start) == start  # free again: the job's own port
    assert 15000 <= port_of(28999 + 14000 * 3) <= 28999  # job ids far up wrap into the range


def _step_stopped_by_usr1(tmp_path: Path, step_exit: int, scancel_after: str = "", sig: str = "USR1",
                          job: str = "SLURM_JOB_ID=7") -> subprocess.CompletedProcess:
    """dd_run_step with stub srun/scancel/scontrol: ``sig`` arrives while the step runs; the step exits
    ``step_exit`` on its TERM; scancel's and scontrol's calls are logged to scancel.log and scontrol.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    fakes = {"srun": f'echo $$ > "$T/srun.pid"; trap "exit {step_exit}" TERM; while :; do sleep 0.05; done',
             "scancel": 'echo "$*" >> "$T/scancel.log"; kill -TERM "$(cat "$T/srun.pid")"' + scancel_after,
             "scontrol": 'echo "$*" >> "$T/scontrol.log"'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    shell = (f'source launch/slurm/common.sh; LOG_DIR="$T"; {job}; '
             f'(while [ ! -s "$T/srun.pid" ]; do sleep 0.05; done; kill -{sig} $$) & '
             'dd_run_step python train.py; echo "rc=$?"')
    env = dict(os.environ, T=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_preempted_step_reports_its_own_exit_code_and_requeues(tmp_path):
    """No cluster needed: dd_run_step with stand-ins for srun, scancel and scontrol. USR1 arrives; the trap's
    scancel stops the step (exit 75, as checkpointing ranks do) while the trap is still running: the status
    reported is the step's 75, not the interrupted wait's 138, and the job is requeued."""
    done = _step_stopped_by_usr1(tmp_path, step_exit=75, scancel_after="; sleep 1")  # (ends before the trap returns)
    assert "training step ended with status 75" in done.stdout and done.stdout.rstrip().endswith("rc=75"), done
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "7"]


def test_an_array_task_signals_and_requeues_itself_alone_and_usr2_stops_without_requeue(tmp_path):
    """No cluster needed. In a job array the task whose SLURM_JOB_ID is the array's id stopped and requeued every
    task of the array (scancel and scontrol take a bare array id as all of it): each task names itself,
    ARRAYID_TASKID. USR2 (scancel --batch --signal=USR2): the checkpointing stop, exit 75, no requeue."""
    done = _step_stopped_by_usr1(tmp_path / "array", step_exit=75,
                                 job="SLURM_JOB_ID=12; SLURM_ARRAY_JOB_ID=12; SLURM_ARRAY_TASK_ID=3")
    assert done.stdout.rstrip().endswith("rc=75"), done
    assert (tmp_path / "array" / "scancel.log").read_text().split() == ["--signal=TERM", "12_3"]
    assert (tmp_path / "array" / "scontrol.log").read_text().split() == ["requeue", "12_3"]
    done = _step_stopped_by_usr1(tmp_path / "usr2", step_exit=75, sig="USR2")
    assert done.stdout.rstrip().endswith("rc=75") and "got SIGUSR2" in done.stdout, done
    assert not (tmp_path / "usr2" / "scontrol.log").exists()


def test_a_preempted_accelerate_launch_step_exits_75_not_its_launchers_143(tmp_path):
    """No cluster needed: as above, but the step is what `accelerate launch` does: torch's launcher waits for its
    ranks' checkpoint and then exits 128 + SIGTERM = 143 (it reports the TERM it got, not the ranks' 75). After a
    stop signal the job must end with the documented 75 and requeue; a step that fails on its own keeps its code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": 'echo $$ > "$T/srun.pid"; trap "exit 143" TERM; while [ ! -e "$T/fail" ]; do sleep 0.05; done; '
                     'exit 143',
             "scancel": 'kill -TERM "$(cat "$T/srun.pid")"',
             "scontrol": 'echo "$*" >> "$T/scontrol.log"'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, T=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}")
    preempt = ('source launch/slurm/common.sh; LOG_DIR="$T"; SLURM_JOB_ID=7; '
               '(while [ ! -s "$T/srun.pid" ]; do sleep 0.05; done; kill -USR1 $$) & '
               'dd_run_step python train.py; echo "rc=$?"')
    done = subprocess.run(["bash", "-c", preempt], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.rstrip().endswith("rc=75"), done
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "7"]

    (tmp_path / "fail").touch()  # no signal: a 143 of its own (a launcher killed from outside) stays 143
    alone = 'source launch/slurm/common.sh; LOG_DIR="$T"; SLURM_JOB_ID=8; dd_run_step python train.py; echo "rc=$?"'
    done = subprocess.run(["bash", "-c", alone], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.rstrip().endswith("rc=143"), done


def _submit_with_stubs(tmp_path: Path, script: str, *args: str, **env_over: str) -> tuple[subprocess.CompletedProcess, str]:
    """No cluster needed: the whole sbatch script as a batch shell runs it, with stand-ins for srun (records its
    arguments, runs nothing), scontrol and scancel. Returns the script's result and srun's arguments ('' if none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {"srun": 'printf "%s\\n" "$@" > "$T/srun.args"', "scontrol": 'printf "node1\\nnode2\\n"', "scancel": ":"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCH_ELASTIC", "SRUN_"))}
    env.update({"T": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
                "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
                "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4", **env_over})
    done = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    called = tmp_path / "srun.args"
    return done, called.read_text() if called.exists() else ""


@pytest.mark.parametrize("script", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_the_training_step_gets_the_cpus_the_job_asked_for(tmp_path, script):
    """Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it on the srun line, the step
    (the launcher, every rank of the node and their data workers) gets one core."""
    done, srun = _submit_with_stubs(tmp_path, script, "configs/div2k.yaml", f"train.run_dir={tmp_path}/run")
    assert done.returncode == 0, done.stderr
    assert "--cpus-per-task=16" in srun.splitlines(), srun


@pytest.mark.parametrize("script", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_each_job_rendezvous_on_a_port_of_its_own(tmp_path, script):
    """The single-node script left accelerate on its default port, 29500: two jobs packed onto one node that start
    in the same second both saw it free, and one died binding it (EADDRINUSE: exit 1, not requeued). Each job
    now takes a port by its id, as the multi-node script did."""
    ports = []
    for job in ("7", "8"):
        done, srun = _submit_with_stubs(tmp_path, script, "configs/div2k.yaml", f"train.run_dir={tmp_path}/run{job}",
                                        SLURM_JOB_ID=job)
        assert done.returncode == 0, done.stderr
        args = srun.replace("--main_process_port ", "--main_process_port\n").split()
        ports.append(args[args.index("--main_process_port") + 1] if "--main_process_port" in args else None)
    assert None not in ports and "29500" not in ports and len(set(ports)) == 2, ports


def test_a_requeued_job_trains_on_the_config_its_run_began_with(tmp_path):
    """A requeue read the repository's config file as it was then: edited while the job waited, every key but the
    model's shapes changed quietly (a phase's steps: a phase ended early). A requeued job (SLURM_RESTART_COUNT)
    now continues with the run folder's config.yaml (as the run writes it: it loads as the same config); a new
    submission reads the file it names."""
    from dist_dejpeg.config import load_config, to_yaml

    run = tmp_path / "run"
    run.mkdir()
    began = load_config(ROOT / "configs" / "div2k.yaml", [f"train.run_dir={run}"])
    (run / "config.yaml").write_text(to_yaml(began))
    assert load_config(run / "config.yaml", [f"train.run_dir={run}"]) == began
    for restart, config in (("0", "configs/div2k.yaml"), ("1", str(run / "config.yaml"))):
        done, srun = _submit_with_stubs(tmp_path, "train_single_node.sbatch", "configs/div2k.yaml",
                                        f"train.run_dir={run}", SLURM_RESTART_COUNT=restart)
        assert done.returncode == 0, done.stderr
        args = srun.split()
        assert args[args.index("--config") + 1] == config, (restart, srun)


def test_a_percent_sign_in_the_run_folder_reaches_srun_escaped(tmp_path):
    """srun reads --output as a pattern (%j job id, %n node): a run folder named for a sweep's 50% point would have
    its node logs written to another folder."""
    done, srun = _submit_with_stubs(tmp_path, "train_single_node.sbatch", "configs/div2k.yaml",
                                    f"train.run_dir={tmp_path}/lr-50%")
    assert done.returncode == 0, done.stderr
    assert f"--output={tmp_path}/lr-50%%/logs/train-7-node%n.log" in srun.splitlines(), srun


def test_a_larger_preempt_budget_gives_the_launcher_longer_to_wait(tmp_path):
    """The trainer's advice for slow checkpoints is more --signal lead time and a larger train.preempt_budget_s:
    torch's launcher must then wait that much longer before it SIGKILLs the checkpointing ranks."""
    run_dir = tmp_path / "run"
    shell = ('CONFIG=configs/div2k.yaml; OVERRIDES=("train.run_dir=$1" train.preempt_budget_s=300); '
             'source launch/slurm/common.sh; dd_setup; echo "timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCH_ELASTIC"))}
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="8", SLURM_JOB_NODELIST="node1", PYTHON=sys.executable)
    done = subprocess.run(["bash", "-c", shell, "bash", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = re.search(r"timeout=(\d+)", (run_dir / "logs" / "job-8.log").read_text())
    assert found and int(found.group(1)) > 300, found


@pytest.mark.parametrize(("given", "procs"), [
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "h100:4"}, "2"),
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "3"}, "3"),
    ({"CUDA_VISIBLE_DEVICES": "0,3"}, "2"),
    ({}, "1 cpu"),
])
def test_one_process_per_gpu_the_job_got_on_the_node(tmp_path, given, procs):
    """The GPU count comes from what SLURM gave the job (an older Slurm sets only --gpus-per-node's "h100:4", or
    CUDA_VISIBLE_DEVICES), not from nvidia-smi, which lists the node's GPUs that other jobs hold too; with none,
    the job log says it trains on CPU processes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100\"; done\n")
    smi.chmod(0o755)
    shell = ('CONFIG=configs/div2k.yaml; OVERRIDES=("train.run_dir=$1"); source launch/slurm/common.sh; dd_setup; '
             'echo "procs=$PROCS${ACCELERATE_USE_CPU:+ cpu}"')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCH_ELASTIC", "ACCELERATE_")) and k != "CUDA_VISIBLE_DEVICES"}
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="9", SLURM_JOB_NODELIST="node1", PYTHON=sys.executable,
               PATH=f"{bin_dir}:{env['PATH']}", **given)
    if not given:
        smi.write_text("#!/bin/sh\nexit 9\n")  # no driver: no GPU
    done = subprocess.run(["bash", "-c", shell, "bash", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "run" / "logs" / "job-9.log").read_text()
    assert f"procs={procs}\n" in log, log
    assert ("no GPU on this node" in log) == (procs == "1 cpu"), log


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done
    return lines[0]


def test_a_script_submitted_from_another_folder_says_so_in_one_line(tmp_path):
    done, srun = _submit_with_stubs(tmp_path, "train_multi_node.sbatch", str(ROOT / "configs" / "div2k.yaml"),
                                    SLURM_SUBMIT_DIR=str(tmp_path))
    assert "repository root" in _one_error_line(done) and not srun


def test_an_environment_without_the_project_fails_in_one_line_before_any_step(tmp_path):
    """sbatch from a shell whose venv is not active (or a cluster that does not pass PATH on): a python that cannot
    import the project stops the job on the batch node with one line, not a traceback on every node."""
    bare = tmp_path / "bare-python"  # site-packages off: torch, accelerate and numpy are missing, as outside the venv
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    for python in (str(bare), str(tmp_path / "no-such-venv" / "bin" / "python")):
        done, srun = _submit_with_stubs(tmp_path, "train_multi_node.sbatch", "configs/div2k.yaml", PYTHON=python)
        assert "PYTHON" in _one_error_line(done) and not srun, done.stderr


def test_a_run_folder_that_cannot_be_created_fails_before_any_step(tmp_path):
    (tmp_path / "a-file").write_text("")
    done, srun = _submit_with_stubs(tmp_path, "train_multi_node.sbatch", "configs/div2k.yaml",
                                    f"train.run_dir={tmp_path}/a-file/run")
    assert "a-file/run/logs" in _one_error_line(done) and not srun


def test_a_step_that_finished_before_the_stop_is_not_requeued(tmp_path):
    """USR1 arrives as the training finishes (its last validation done, the ranks exiting 0): requeueing would run
    the job again, wait for nodes, and validate the finished run once more."""
    done = _step_stopped_by_usr1(tmp_path, step_exit=0)
    assert done.stdout.rstrip().endswith("rc=0"), done
    assert not (tmp_path / "scontrol.log").exists(), (tmp_path / "scontrol.log").read_text()
