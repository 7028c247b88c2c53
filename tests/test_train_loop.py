"""The one training loop: the built-in training, `normscope train` and compare all run it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from normscope.data import digits_loader
from normscope.models import build_model
from normscope.train import epoch_batches, train_loop, train_reference


def test_train_reference_is_the_plain_sgd_loop():
    """train_reference equals a hand-written SGD loop on the same seeded batches, bit for bit."""
    model = build_model("mlp_bn", seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = digits_loader(batch_size=64, seed=3, split="train", drop_last=True)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for _ in range(2):
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
    trained = train_reference(epochs=2, seed=3)
    for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_cosine_schedule_decays_to_zero_and_epoch_lines(capsys):
    model = build_model("mlp_bn", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = digits_loader(batch_size=100, seed=0, split="train", drop_last=True, flat=True)
    seen = []
    lines = []
    result = train_loop(
        model, epoch_batches(loader, 2), 2 * len(loader), 0.1, per_epoch=len(loader), optimizer=optimizer,
        lr_schedule="cosine", on_step=lambda info: seen.append(optimizer.param_groups[0]["lr"]),
        on_epoch=lambda e, n, loss, s: lines.append((e, n, loss)),
    )
    steps = 2 * len(loader)
    assert result.steps == steps and not result.diverged
    # after update t the rate is lr * (1 + cos(pi t / T)) / 2, 0 after the last
    for t, rate in enumerate(seen, start=1):
        assert math.isclose(rate, 0.1 * (1 + math.cos(math.pi * t / steps)) / 2, abs_tol=1e-12)
    assert seen[-1] < 1e-12
    assert [(e, n) for e, n, _ in lines] == [(1, 2), (2, 2)] and lines[1][2] < lines[0][2]


def test_stops_at_a_non_finite_loss():
    model = build_model("mlp_bn", seed=0)
    loader = digits_loader(batch_size=100, seed=0, split="train", drop_last=True, flat=True)
    result = train_loop(model, epoch_batches(loader, 1), 10, 1e6)
    assert result.diverged and result.steps < 10


def test_progress_off_a_terminal_is_one_line_per_epoch(capsys):
    train_reference(epochs=2, seed=0, show_progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("normscope: training mlp_bn epoch")]
    assert [line.split(":")[1].strip() for line in lines] == ["training mlp_bn epoch 1/2", "training mlp_bn epoch 2/2"]
