"""Multi-node launches on one machine over loopback: two per-node launches without ssh stand in
for two nodes, torchrun for a second launcher, a DeepSpeed hostfile run up to the pdsh call,
SLURM scripts, and what happens when a node dies or hangs.

Each "node" is a `safebasin` command in its own process group, so killing the group kills the
node: its launcher and ranks at once, with nothing cleaned up."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, safebasin_cli
from safebasin.launcher.launch import free_port
from test_train import losses, write_config

# One thread per rank: two ranks share the two cores of a small machine.
ENV = {"OMP_NUM_THREADS": "1"}
# The job: 6 steps of a 2-rank ZeRO-2 LoRA run, a checkpoint every 2 steps. A failure is
# injected after step 3, so the newest checkpoint is step2 and the next save (step4) never starts.
FAIL_AT = {"SAFEBASIN_FAIL_AFTER_STEP": "3", "SAFEBASIN_FAIL_RANK": "1", "SAFEBASIN_FAIL_MODE": "hang"}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("multinode")
    cfg = write_config(root, train={"gradient_accumulation_steps": 1, "save_every": 2})
    return {"root": root, "cfg": cfg, "env": {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}}


@pytest.fixture(scope="module")
def ref(job):
    """The reference: one node, two ranks, started by torchrun. Every other launch of the job must
    reproduce its losses."""
    res = safebasin_cli("train", str(job["cfg"]), f"output.dir={job['root'] / 'ref'}", "--launcher", "torchrun",
                        "--nproc", "2", cwd=job["root"], env=job["env"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return {"losses": losses(job["root"] / "ref"), "output": res.stdout + res.stderr}


def start_node(job, out: str, node_rank: int, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`safebasin train` as node `node_rank` of 2 (one rank each); output goes to OUT-nodeR.log."""
    cmd = [sys.executable, "-m", "safebasin.launcher.cli", "train", str(job["cfg"]), f"output.dir={job['root'] / out}",
           "--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
           *extra]
    log = job["root"] / f"{out}-node{node_rank}.log"
    with log.open("w") as f:
        # A file, not a pipe: nobody reads a pipe while the test waits, and a full one blocks the node.
        proc = subprocess.Popen(cmd, cwd=job["root"], env={**os.environ, **job["env"], **(env or {})},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def output(node: subprocess.Popen) -> str:
    return node.log.read_text(errors="replace")


def kill_node(node: subprocess.Popen) -> None:
    """Kill whatever is left of the node's process group (its command may be gone, ranks not)."""
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left
    node.wait()


def wait_nodes_succeed(nodes: list[subprocess.Popen], timeout: float = 400) -> None:
    """Wait for every node to finish (killing what is left either way); all must exit 0."""
    try:
        codes = [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            kill_node(node)
    assert codes == [0] * len(nodes), "".join(output(node)[-3000:] for node in nodes)


def wait_for_step(job, out: str, step: int, nodes: list[subprocess.Popen], timeout: float = 300) -> None:
    metrics = job["root"] / out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        for node in nodes:
            assert node.poll() is None, f"a node exited before step {step}:\n{output(node)[-4000:]}"
        assert time.monotonic() < deadline, f"the job did not reach step {step} in {timeout}s"
        time.sleep(0.2)


def checkpoint_intact(ckpt: Path, world: int) -> str:
    """The tag `latest` names, after checking that it holds every file of a ZeRO-2 checkpoint."""
    tag = (ckpt / "latest").read_text().strip()
    files = {p.name for p in (ckpt / tag).iterdir()}
    assert "mp_rank_00_model_states.pt" in files
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)} <= files
    return tag


def mlflow_history(job, out: str) -> tuple[str, list[int]]:
    import mlflow
    mlflow.set_tracking_uri(job["env"]["MLFLOW_TRACKING_URI"])
    run_id = json.loads((job["root"] / out / "mlflow_run.json").read_text())["run_id"]
    return run_id, sorted({m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")})


@pytest.mark.multiproc
def test_torchrun_runs_two_ranks_on_one_node(job, ref):
    assert len(ref["losses"]) == 6 and ref["losses"][-1] < ref["losses"][0]
    assert "world size 2, torchrun" in ref["output"]
    assert "[rank 0] " in ref["output"] and "[rank 1] " in ref["output"]  # every rank's lines carry its rank
    from safebasin.safety_core.train.checkpoints import saved_world_size
    assert saved_world_size(job["root"] / "ref" / "checkpoints") == 2


@pytest.mark.multiproc
def test_per_node_launches_match_one_node_and_share_one_mlflow_run(job, ref):
    port, logs = free_port(), job["root"] / "pernode-ranks"
    # Nodes that share no home directory: each has its own cache, which its local rank 0 fills.
    homes = [job["root"] / f"home{r}" for r in (0, 1)]
    nodes = [start_node(job, "pernode", r, port, "--rank-logs", str(logs),
                        env={"HOME": str(homes[r]), "SAFEBASIN_CACHE": str(homes[r] / ".cache" / "safebasin")})
             for r in (0, 1)]
    wait_nodes_succeed(nodes)
    cached = [sorted(p.name for p in (home / ".cache" / "safebasin" / "tokenized").glob("*.arrow")) for home in homes]
    assert cached[0] and cached[0] == cached[1]  # each node tokenised the same sets into its own cache
    # Tolerance: the same two ranks reduce in the same order whatever launched them, so only
    # float noise is allowed.
    assert losses(job["root"] / "pernode") == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    node0, node1 = output(nodes[0]), output(nodes[1])
    assert "node 1 of 2" in node1 and "node 0 reports the result" in node1
    assert "[rank 1] " in node1 and "[rank 0] " not in node1
    assert "safebasin: trained 6 steps" in node0
    # --rank-logs: each rank's own output, unprefixed, in its file.
    rank1_log = (logs / "rank1.log").read_text()
    assert "[rank" not in rank1_log and (logs / "rank0.log").stat().st_size > 0

    run_id, steps = mlflow_history(job, "pernode")
    assert steps == [1, 2, 3, 4, 5, 6]  # one run holds every step, not one run per node
    assert f"run {run_id}" in node0


@pytest.mark.multiproc
def test_killed_node_fails_the_other_and_the_job_resumes_on_one_rank(job, ref):
    timeout_s = 120  # the collective timeout; a dead peer must be noticed long before it
    port = free_port()
    env = {"SAFEBASIN_COLLECTIVE_TIMEOUT_S": str(timeout_s)}
    nodes = [start_node(job, "killed", 0, port, env=env), start_node(job, "killed", 1, port, env={**env, **FAIL_AT})]
    try:
        wait_for_step(job, "killed", 3, nodes)  # node 1 now idles after step 3: kill it there
        os.killpg(nodes[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        code = nodes[0].wait(timeout=timeout_s + 60)
        noticed = time.monotonic() - killed
    finally:
        for node in nodes:
            kill_node(node)
    print(f"node 0 exited {noticed:.1f}s after node 1 was killed")
    assert code != 0, output(nodes[0])[-3000:]
    assert noticed < timeout_s / 2, output(nodes[0])[-3000:]
    ckpt = job["root"] / "killed" / "checkpoints"
    assert checkpoint_intact(ckpt, world=2) == "step2"

    # The same config on one rank: the trainer keeps the checkpoint's global batch with two
    # accumulation steps (4 x 1 x 2 ranks = 4 x 2 x 1), so it sees the same examples per step;
    # the tool converts the 2-rank checkpoint to the universal format first.
    res = safebasin_cli("train", str(job["cfg"]), f"output.dir={job['root'] / 'killed'}", "--resume",
                        cwd=job["root"], env=job["env"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "universal form" in res.stdout
    assert "train.gradient_accumulation_steps 1 -> 2 keeps the checkpoint's global batch of 8" in res.stdout
    # Tolerance: steps 3-6 sum gradients in another order (two micro-batches on one rank instead
    # of one on each of two ranks), which moves float32 losses by about 1e-6 relative.
    assert losses(job["root"] / "killed") == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    from safebasin.safety_core.train.checkpoints import saved_world_size
    assert saved_world_size(ckpt) == 1 and not list(ckpt.glob("universal-*"))
    run_id, steps = mlflow_history(job, "killed")
    assert f"run {run_id}" in res.stdout and steps == [1, 2, 3, 4, 5, 6]  # the resumed job reattached


@pytest.mark.multiproc
def test_one_rank_job_resumes_on_two_ranks(job, ref):
    """The other way round: a job saved at 1 rank continues at 2 (more nodes came back)."""
    out = job["root"] / "grown"
    one_rank = ["train.gradient_accumulation_steps=2", f"output.dir={out}"]
    res = safebasin_cli("train", str(job["cfg"]), *one_rank, cwd=job["root"],
                        env={**job["env"], "SAFEBASIN_FAIL_AFTER_STEP": "3"})
    assert res.returncode != 0 and "injected failure" in res.stdout + res.stderr
    from safebasin.safety_core.train.checkpoints import saved_world_size
    assert saved_world_size(out / "checkpoints") == 1 and (out / "checkpoints" / "latest").read_text() == "step2"
    # A global batch of 8 cannot be kept with 3 x 2 ranks per accumulation step: refused before
    # any rank starts, naming the numbers and the fix; the checkpoint is left as it was.
    res = safebasin_cli("train", str(job["cfg"]), *one_rank, "train.micro_batch_size=3", "--nproc", "2",
                        "--resume", cwd=job["root"], env=job["env"])
    assert res.returncode == 2 and "4 x 2 x 1 = 8 when the job started, 3 x 2 x 2 = 12 now" in res.stderr
    assert "keeps 8 with 3 x 2 ranks: set train.micro_batch_size to one of [1, 2, 4]" in res.stderr
    assert "[rank" not in res.stdout + res.stderr and not list((out / "checkpoints").glob("universal-*"))
    # The same config (two accumulation steps) on 2 ranks: the trainer keeps the global batch with one.
    res = safebasin_cli("train", str(job["cfg"]), *one_rank, "--nproc", "2", "--resume",
                        cwd=job["root"], env=job["env"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "universal form" in res.stdout
    assert "train.gradient_accumulation_steps 2 -> 1 keeps the checkpoint's global batch of 8" in res.stdout
    assert losses(out) == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    assert saved_world_size(out / "checkpoints") == 2


@pytest.mark.multiproc
def test_hung_node_fails_the_other_at_the_timeout_and_the_job_resumes_per_node(job, ref):
    # Long enough that start-up skew between the two nodes of a loaded 2-core machine never
    # trips it (it also bounds the rendezvous and every collective on the way to step 3).
    timeout_s = 40
    port = free_port()
    env = {"SAFEBASIN_COLLECTIVE_TIMEOUT_S": str(timeout_s)}
    nodes = [start_node(job, "hung", 0, port, env=env), start_node(job, "hung", 1, port, env={**env, **FAIL_AT})]
    try:
        wait_for_step(job, "hung", 3, nodes)  # node 1 stops answering after step 3, its sockets open
        hung = time.monotonic()
        code = nodes[0].wait(timeout=timeout_s + 120)
        waited = time.monotonic() - hung
        assert nodes[1].poll() is None  # still there: only the timeout could end node 0
    finally:
        for node in nodes:
            kill_node(node)
    print(f"node 0 exited {waited:.1f}s after node 1 hung (collective timeout {timeout_s}s)")
    assert code != 0 and "Timed out" in output(nodes[0]), output(nodes[0])[-3000:]
    # Margin over the timeout: the failing rank's teardown and the launcher's exit on a loaded machine.
    assert timeout_s * 0.9 < waited < timeout_s + 60
    assert checkpoint_intact(job["root"] / "hung" / "checkpoints", world=2) == "step2"
    failed_run, _ = mlflow_history(job, "hung")

    # Both nodes again with --resume: same world size, so the ZeRO shards load as they are.
    port = free_port()
    nodes = [start_node(job, "hung", r, port, "--resume") for r in (0, 1)]
    wait_nodes_succeed(nodes)
    assert losses(job["root"] / "hung") == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    run_id, steps = mlflow_history(job, "hung")
    assert run_id == failed_run and f"run {run_id}" in output(nodes[0]) and steps == [1, 2, 3, 4, 5, 6]


def test_hostfile_goes_through_the_deepspeed_runner_to_pdsh(job, tmp_path):
    """No ssh or pdsh here: stand-ins answer the runner's ssh checks and record the pdsh command
    line instead of running it, which is as far as a hostfile run goes on one machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/bash\necho 10.9.8.7\n")  # `ssh HOST hostname -I` for the master address
    (bin_dir / "pdsh").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$PDSH_RECORD"\nexit 7\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two hosts, two slots each\nworker-0 slots=2\nworker-1 slots=2\n")
    out, record = tmp_path / "hf", tmp_path / "pdsh.args"
    res = safebasin_cli("train", str(job["cfg"]), f"output.dir={out}", "--hostfile", str(hostfile),
                        "--exclude", "worker-1:1", cwd=tmp_path, timeout=300,
                        env={**job["env"], "PATH": f"{bin_dir}:{os.environ['PATH']}", "PDSH_RECORD": str(record),
                             "SAFEBASIN_EXAMPLE": "a b", "SAFEBASIN_UNSAFE": 'x"$y', "PYTHONPATH": "/opt/extra"})
    assert res.returncode == 7, res.stdout[-3000:] + res.stderr[-6000:]  # pdsh's exit code comes back
    assert "3 ranks on the hosts of" in res.stdout
    assert "not forwarding SAFEBASIN_UNSAFE" in res.stderr
    args = record.read_text().split("\0")[:-1]
    assert args[args.index("-w") + 1] == "worker-0,worker-1"
    remote = " ".join(args[args.index("-w") + 2:])
    # Every host exports what the ranks need, from OUTPUT/.deepspeed_env (private: it may hold tokens).
    for export in ('export SAFEBASIN_EXAMPLE="a b";', "export DS_ACCELERATOR=cpu;",
                   f"export MLFLOW_TRACKING_URI={job['env']['MLFLOW_TRACKING_URI']};"):
        assert export in remote
    assert "SAFEBASIN_UNSAFE" not in remote
    # The runner's own PYTHONPATH export (launching directory first) is not overridden by ours.
    assert f"export PYTHONPATH={tmp_path}:/opt/extra;" in remote and remote.count("PYTHONPATH") == 1
    assert (out / ".deepspeed_env").stat().st_mode & 0o077 == 0
    # ... then starts its share of the ranks with the per-node launcher, %n being the host's index.
    world_info = next(a for a in args if a.startswith("--world_info=")).split("=", 1)[1]
    assert json.loads(base64.urlsafe_b64decode(world_info)) == {"worker-0": [0, 1], "worker-1": [0]}
    assert "--node_rank=%n" in args and "--master_addr=10.9.8.7" in args
    assert "--module" in args  # (the runner puts its own flags between it and the module)
    tail = args[args.index("safebasin.launcher.ranklog"):]
    assert tail == ["safebasin.launcher.ranklog", "train", str((out / "config.yaml").resolve())]


def test_bad_config_or_layout_fails_before_any_rank_starts(job, tmp_path, capsys):
    from safebasin.launcher.cli import build_parser, main
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(job["cfg"]), "train.lr=-1", f"output.dir={tmp_path / 'bad'}", "--nnodes", "2",
              "--node-rank", "1", "--master-addr", "127.0.0.1"])
    assert exit_.value.code == 2 and "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written, no rank started to wait for a peer

    from argparse import Namespace

    from safebasin.launcher.topology import LaunchError, resolve
    layout = dict(nproc=None, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=None)
    assert resolve(Namespace(**layout), {}).master_port == 29500
    for bad, message in (({"node_rank": 2}, "--node-rank"), ({"master_addr": None}, "--master-addr"),
                         ({"hostfile": "hosts"}, "pick one"), ({"nproc": 0}, "--nproc"),
                         ({"nnodes": None, "node_rank": None, "hostfile": "hosts", "launcher": "torchrun"},
                          "DeepSpeed runner")):
        with pytest.raises(LaunchError, match=message):
            resolve(Namespace(**{**layout, **bad}), {})
    # Every job command takes the launch options and resolves them before it starts anything.
    for command, cfg in (("eval", "tiny_eval.yaml"), ("restore", "tiny_restore.yaml"),
                         ("landscape", "tiny_landscape.yaml")):
        args = build_parser().parse_args([command, str(REPO / "examples" / cfg), f"output.dir={tmp_path / command}",
                                          "--launcher", "torchrun", "--nnodes", "2", "--node-rank", "2",
                                          "--master-addr", "127.0.0.1"])
        with pytest.raises(LaunchError, match="--node-rank"):
            args.func(args)
        assert not (tmp_path / command).exists()


def test_slurm_script_and_step_layout(job, tmp_path, monkeypatch):
    from safebasin.launcher.cli import main
    script = tmp_path / "job.sbatch"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["slurm", str(job["cfg"]), "train.max_steps=8", "data.system_prompt=Be 'brief'", "--nodes", "2",
              "--gpus-per-node", "4", "--partition", "gpu", "--time", "01:00:00", "--out", str(script)])
    assert exit_.value.code == 0
    text = script.read_text()
    assert f"cd {tmp_path}" in text  # every node starts where the script was written
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "srun --ntasks-per-node=1 --kill-on-bad-exit=1"):
        assert line in text
    assert f"safebasin train {job['cfg'].resolve()} train.max_steps=8" in text
    assert '--node-rank "$SLURM_PROCID"' in text and "--nproc 4" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # Run the script with SLURM stood in: srun starts its command once per node with that task's
    # variables, and `safebasin` only prints the arguments it was given.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                               "for i in 0 1; do SLURM_PROCID=$i \"$@\"; done\n")
    (fake / "scontrol").write_text("#!/bin/bash\necho n01; echo n02\n")
    (fake / "safebasin").write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"; echo ---\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    exe = text.split("safebasin-node ", 1)[1].split(" ", 1)[0]
    runnable = tmp_path / "run.sh"
    runnable.write_text(text.replace(exe, str(fake / "safebasin")))
    # A fresh allocation: no rendezvous variables left by jobs this test process ran in-process.
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    out = subprocess.run(["bash", str(runnable)], capture_output=True, text=True,
                         env={**clean, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
                              "SLURM_JOB_NODELIST": "n[01-02]", "SLURM_NNODES": "2"})
    assert out.returncode == 0, out.stderr
    tasks, argv = [], []
    for line in out.stdout.splitlines():
        if line == "---":
            tasks.append(argv)
            argv = []
        else:
            argv.append(line)
    assert len(tasks) == 2
    for rank, argv in enumerate(tasks):
        assert argv[:4] == ["train", str(job["cfg"].resolve()), "train.max_steps=8", "data.system_prompt=Be 'brief'"]
        tail = " ".join(argv[4:]).strip()
        assert tail == f"--nproc 4 --nnodes 2 --node-rank {rank} --master-addr n01 --master-port 21234"

    # Inside an srun step the launch options come from SLURM's variables.
    from argparse import Namespace

    from safebasin.launcher.slurm import expand_nodelist
    from safebasin.launcher.topology import LaunchError, resolve
    assert expand_nodelist("gpu[01-03,07],login1,r[1-2]n[8-9]") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "login1", "r1n8", "r1n9", "r2n8", "r2n9"]
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "2",
            "SLURM_STEP_NODELIST": "node[003-005]", "SLURM_JOB_NODELIST": "node[003-005]", "SLURM_GPUS_ON_NODE": "8"}
    args = Namespace(nproc=None, nnodes=None, node_rank=None, master_addr=None, master_port=None)
    topo = resolve(args, step)
    assert (topo.nnodes, topo.node_rank, topo.master_addr, topo.master_port, topo.nproc, topo.world_size) == \
        (3, 2, "node003", 20077, 8, 24)
    with pytest.raises(LaunchError, match="one task per node"):
        resolve(args, {**step, "SLURM_STEP_NUM_TASKS": "24"})
    # The batch script itself (no srun step) runs on its node only, rather than waiting for peers.
    assert resolve(args, {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}).world_size == 1
