"""``HessianOperator(split=world)`` under torch.distributed: two gloo CPU processes split the
products and the gradient of an eval-mode float64 loss over example pieces (50 and 51 of 101
examples, or 8 pieces under memory chunks) and every rank ends with the whole batch's vector;
checked against the dense Hessian of the loss computed here, in one process."""

from __future__ import annotations

import math
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.func import functional_call

from normscope.analyzers.hvp import BatchLoss, HessianOperator, rank_pieces, select_backend
from normscope.distributed import World
from tests.distributed_helpers import EXAMPLES, data, two_level_net

LAST = ["6.weight", "6.bias"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vectors(n: int, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(count)]


def _rank(rank: int, size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    world = World(rank, size, "gloo")
    got: dict = {}
    try:
        loss = BatchLoss(two_level_net(), *data(), mode="eval")
        whole = HessianOperator(loss, backend="double_backward")
        vs = _vectors(whole.numel)
        got["whole"] = [whole(v) for v in vs]
        got["whole_gradient"] = whole.gradient()

        split = HessianOperator(loss, backend="double_backward", split=world)  # kept piece graphs
        got["pieces"] = [len(part.targets) for _, part in split.pieces]
        got["own"] = [len(part.targets) for _, _, part in split._own()]
        got["split_world"] = split.world == world
        got["split_gradient"] = split.gradient()
        got["split"] = [split(v) for v in vs]
        block = split.block(LAST)
        got["block"] = block(torch.cat([whole.split(vs[0])[n].reshape(-1) for n in LAST]))
        got["products"] = split.products + block.products

        chunked = HessianOperator(loss, backend="func", chunks=loss.example_chunks(16), split=world)  # 7 memory chunks: 8 pieces
        got["chunked_pieces"] = len(chunked.pieces)
        got["chunked"] = [chunked(v) for v in vs]
        got["chunked_gradient"] = chunked.gradient()

        auto = HessianOperator(loss, backend="double_backward", split=world)
        got["auto"] = select_backend(auto, vs[0], math.inf, good_enough=0.0)  # times both backends: agreed timings
        got["auto_backend"], got["auto_extra"] = auto.backend, auto.selection_products

        if rank == 0:  # an unsplit twin on one rank only: no collective, so no hang
            got["local"] = split.local()(vs[1])
        torch.distributed.barrier()

        train = BatchLoss(two_level_net(), *data(), mode="train")
        replicated = HessianOperator(train, backend="double_backward", split=world)
        got["train_world"], got["train_pieces"] = replicated.world, replicated.pieces
        got["train"] = replicated(vs[0]) if rank == 1 else None  # no collective: one rank alone may call it
        got["train_whole"] = HessianOperator(train, backend="double_backward")(vs[0]) if rank == 1 else None
        got["float32_pieces"] = rank_pieces(BatchLoss(two_level_net(), *data(), mode="eval", dtype=torch.float32), world)
    finally:
        torch.distributed.destroy_process_group()
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(got, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hvp_ranks")
    mp.start_processes(_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


@pytest.fixture(scope="module")
def dense() -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode loss's gradient and Hessian over the flat parameters, by torch.autograd.functional."""
    net = two_level_net().eval()
    inputs, targets = data()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(theta: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (t.reshape(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return torch.nn.functional.cross_entropy(functional_call(net, params, (inputs,)), targets)

    return torch.autograd.functional.jacobian(f, flat), torch.autograd.functional.hessian(f, flat, vectorize=True)


def test_split_products_equal_the_whole_batch_and_the_dense_hessian(ranks, dense):
    gradient, hessian = dense
    vs = _vectors(hessian.shape[0])
    for got in ranks:
        assert got["split_world"] and got["pieces"] == [50, 51] and len(got["own"]) == 1
        for name in ("split", "chunked", "whole"):
            for hv, v in zip(got[name], vs):
                torch.testing.assert_close(hv, hessian @ v, rtol=1e-12, atol=1e-12 * float(hessian.abs().max()))
        for name in ("split", "chunked"):
            for hv, whole in zip(got[name], got["whole"]):
                assert float((hv - whole).abs().max()) <= 1e-12 * float(whole.abs().max())
        for name in ("split_gradient", "chunked_gradient", "whole_gradient"):
            torch.testing.assert_close(got[name], gradient, rtol=1e-12, atol=1e-14)
        assert got["chunked_pieces"] == 8  # 7 memory chunks of 16: 4 pieces per rank, none larger than a chunk
    assert [len(got["own"]) for got in ranks] == [1, 1] and ranks[0]["own"] != ranks[1]["own"]


def test_every_rank_ends_with_the_same_vector_after_the_same_products(ranks):
    first, second = ranks
    for name in ("split", "chunked"):
        for a, b in zip(first[name], second[name]):
            assert torch.equal(a, b)
    assert torch.equal(first["split_gradient"], second["split_gradient"]) and torch.equal(first["block"], second["block"])
    assert first["products"] == second["products"] == 4


def test_a_block_of_a_split_operator_is_the_diagonal_block(ranks, dense):
    _, hessian = dense
    v = _vectors(hessian.shape[0])[0]
    last = 8 * 3 + 3  # 6.weight and 6.bias, the last parameters of the flat vector
    for got in ranks:
        torch.testing.assert_close(got["block"], hessian[-last:, -last:] @ v[-last:], rtol=1e-12, atol=1e-12)


def test_backend_choice_is_agreed_and_a_local_twin_runs_on_one_rank(ranks, dense):
    first, second = ranks
    _, hessian = dense
    vs = _vectors(hessian.shape[0])
    assert first["auto_backend"] == second["auto_backend"] and first["auto_extra"] == second["auto_extra"] == 3
    torch.testing.assert_close(first["auto"], hessian @ vs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first["local"], hessian @ vs[1], rtol=1e-12, atol=1e-12)


def test_coupled_or_unverifiable_losses_stay_replicated(ranks):
    for got in ranks:
        assert got["train_world"] is None and got["train_pieces"] is None  # BatchNorm's batch statistics couple the examples
        assert got["float32_pieces"] is None  # the decomposition is verified in float64 only
    torch.testing.assert_close(ranks[1]["train"], ranks[1]["train_whole"], rtol=0, atol=0)


def test_balanced_example_chunks_and_no_split_in_one_process():
    loss = BatchLoss(two_level_net(), *data(), mode="eval")
    assert [len(part.targets) for _, part in loss.example_chunks(count=4)] == [25, 25, 25, 26]
    assert sum(w for w, _ in loss.example_chunks(count=4)) == pytest.approx(1.0, abs=1e-15)
    for bad in ({}, {"chunk": 4, "count": 4}, {"count": EXAMPLES + 1}):
        with pytest.raises(Exception, match="chunk"):
            loss.example_chunks(**bad)
    assert rank_pieces(loss, World()) is None and HessianOperator(loss, split=World()).world is None
