"""Tests of pkd.dist: single-process behaviour, and two real gloo processes under torchrun."""

import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from pkd.dist import (
    DistInfo,
    all_gather_objects,
    barrier,
    cleanup,
    gather_to_main,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    reduce_mean,
    seed_everything,
    set_deterministic,
    unwrap,
)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_single_process_info(single_process):
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None, is_main=True)
    assert not info.distributed
    assert not torch.distributed.is_initialized()
    assert init_distributed().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cleanup()  # nothing to destroy


def test_single_process_helpers_are_no_ops(single_process):
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    barrier()
    predictions = {"image_id": 7, "boxes": torch.ones(2, 4)}
    assert all_gather_objects(predictions) == [predictions]
    assert gather_to_main(predictions) == [predictions]

    loss = torch.tensor(1.5, requires_grad=True) * 2
    averaged = reduce_mean(loss)
    assert not averaged.requires_grad and averaged.item() == 3.0
    assert reduce_mean({"loss_cls": torch.tensor(0.25), "loss_pkd": 2, "total": torch.tensor([1.0])}) == {
        "loss_cls": 0.25,
        "loss_pkd": 2.0,
        "total": 1.0,
    }
    assert reduce_mean({}) == {}


def test_reduce_mean_errors():
    with pytest.raises(ValueError, match=r"'boxes' has shape \(2, 4\); dict values must be scalars"):
        reduce_mean({"boxes": torch.ones(2, 4)})
    with pytest.raises(TypeError, match="tensor or a dict of scalars, got list"):
        reduce_mean([torch.ones(1)])


def test_incomplete_environment_is_an_error(single_process, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        RuntimeError, match=r"\['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\] not set; launch with torchrun"
    ):
        init_distributed("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_an_error(single_process):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        init_distributed("cuda")


def test_unwrap():
    model = nn.Linear(2, 2)
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(nn.DataParallel(model))) is model
    # A real DDP needs a process group (and seconds to build); unwrap only looks at the type.
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = model
    assert unwrap(ddp) is model


def test_seed_everything_repeats_and_differs_per_rank():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist()

    assert seed_everything(5) == 5
    first = draw()
    seed_everything(5, rank=0)
    assert draw() == first
    assert seed_everything(5, rank=1) == 6
    assert draw() != first


def test_set_deterministic():
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_benchmark = torch.backends.cudnn.benchmark
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(was_enabled)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = was_benchmark


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from pkd.dist import (all_gather_objects, barrier, cleanup, gather_to_main, get_rank, get_world_size,
                          init_distributed, is_main_process, reduce_mean, seed_everything)

    info = init_distributed("cpu")
    seed_everything(0, info.rank)
    # Ranks hold different amounts of predictions, as after evaluating uneven shards.
    predictions = {"rank": info.rank, "boxes": torch.full((info.rank + 1, 4), float(info.rank))}
    barrier()
    results = {
        "info": [info.rank, info.local_rank, info.world_size, str(info.device), info.backend, info.is_main],
        "helpers": [get_rank(), get_world_size(), is_main_process()],
        "all": all_gather_objects(predictions),
        "main": gather_to_main(predictions),
        "mean": reduce_mean(torch.tensor([float(info.rank), 10.0 * info.rank])),
        "losses": reduce_mean({"loss_cls": torch.tensor(float(info.rank)), "loss_pkd": 4.0 * info.rank}),
        "random": torch.rand(3),
    }
    torch.save(results, f"{sys.argv[1]}/rank{info.rank}.pt")
    cleanup()
    """
)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_two_gloo_processes_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), str(tmp_path),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["info"] == [0, 0, 2, "cpu", "gloo", True]
    assert ranks[1]["info"] == [1, 1, 2, "cpu", "gloo", False]
    assert ranks[0]["helpers"] == [0, 2, True] and ranks[1]["helpers"] == [1, 2, False]

    for result in ranks:
        assert [item["rank"] for item in result["all"]] == [0, 1]  # rank order
        assert [item["boxes"].shape[0] for item in result["all"]] == [1, 2]
        torch.testing.assert_close(result["mean"], torch.tensor([0.5, 5.0]))
        assert result["losses"] == {"loss_cls": 0.5, "loss_pkd": 2.0}
    assert [item["rank"] for item in ranks[0]["main"]] == [0, 1]
    torch.testing.assert_close(ranks[0]["main"][1]["boxes"], torch.ones(2, 4))
    assert ranks[1]["main"] is None

    # seed_everything(seed, rank) gives each rank its own stream (per-rank augmentation).
    assert not torch.equal(ranks[0]["random"], ranks[1]["random"])
