"""Past one machine: two torchrun "nodes" on localhost (one rank each, c10d rendezvous, gloo on
the CPU) train, are killed, resume, and end where one node with two ranks ends."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import ENV, STEPS, completed, final_weights, losses, train_command

PLAN_HEADER = "source              tokens taken"  # the replay plan, printed by rank 0 only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(setup, run_dir: Path, kill: str = "", timeout: int = 180) -> list[tuple]:
    """Two torchrun processes, as two machines would start them; (returncode, stdout, stderr)
    of each."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = train_command(setup, run_dir, "nodes", kill=kill)
    logs = [(run_dir.parent / f"node{rank}.out", run_dir.parent / f"node{rank}.err")
            for rank in range(2)]
    nodes = []
    try:
        for rank, (out, err) in enumerate(logs):  # files, not pipes: neither node blocks
            with open(out, "w") as stdout, open(err, "w") as stderr:
                nodes.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                     "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                     f"--rdzv_endpoint={endpoint}", f"--rdzv_id={endpoint}",
                     "--local_addr=127.0.0.1", *command],
                    env=ENV, stdout=stdout, stderr=stderr, start_new_session=True))
        codes = [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:  # a node left waiting for its peer must not outlive the test
            if node.poll() is None:
                node.kill()
                node.wait()
    return [(code, out.read_text(), err.read_text()) for code, (out, err) in zip(codes, logs)]


@pytest.fixture(scope="module")
def one_node(setup, tmp_path_factory):
    return completed(setup, tmp_path_factory.mktemp("multinode") / "one-node", 2)


def test_two_nodes_train_and_resume_like_one_node_with_two_ranks(setup, one_node, tmp_path):
    run_dir = tmp_path / "two-nodes"
    killed = run_two_nodes(setup, run_dir, kill="step:4")  # the last checkpoint is step 3
    assert all(code != 0 for code, _, _ in killed)
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()
    assert not (run_dir / "checkpoints" / f"step-{STEPS:08d}").exists()

    resumed = run_two_nodes(setup, run_dir)
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    # One world of two ranks, not two worlds of one: only one node ran rank 0.
    assert sum(PLAN_HEADER in out for _, out, _ in resumed) == 1
    # The same numbers as one node with two ranks: the same ranks, reductions and data.
    assert losses(run_dir) == losses(one_node)
    assert losses(run_dir, "grad_norm") == losses(one_node, "grad_norm")
    got, want = final_weights(run_dir), final_weights(one_node)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
