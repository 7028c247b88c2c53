"""Cost of the estimator-bias machinery on the reference ResNet (issue 6), one process.

Prints, per device (CPU, and CUDA when present):
* per-example gradients (``torch.func`` vmap of grad, eval-mode BN) at batch 128 / one plain
  training step (forward + backward, train-mode BN) at batch 128;
* their peak extra memory / (the plain step's peak extra memory + B * params * 4 bytes);
* the streamed population gradient over all 1797 digits (chunks of 128) / one full-batch
  forward-backward of the 1797 digits;
* BackPACK's ``BatchGrad`` on the same eval-mode model, batch and process (where it installs),
  its time / the plain step, and the largest difference from ours.

Run: ``python benchmarks/bias_cost.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from normscope.analyzers.bias import per_example_grads
from normscope.analyzers.population_gradient import streamed_population_gradient
from normscope.data import load_digits
from normscope.models import build_model

BATCH = 128
CHUNK = 32
REPEATS = 7
M_MMAP_THRESHOLD = -3


def _mmap_threshold(size: int) -> None:
    """glibc serves blocks over ``size`` with mmap and returns them on free. 64 KiB while CPU
    memory is measured, so peak RSS follows live tensors instead of what the heap kept; 32 MiB
    while timing, since an mmap per allocation slows steps down."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int = REPEATS) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory above what was held before ``fn`` ran: CUDA allocator peak, or peak RSS on CPU
    (``/proc/self/clear_refs`` resets the high-water mark). One warm-up call first."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) * 1024


def _backpack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        return None
    extended = extend(copy.deepcopy(model), use_converter=True)
    loss_fn = extend(torch.nn.CrossEntropyLoss())

    def run() -> dict[str, torch.Tensor]:
        extended.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            loss_fn(extended(x), y).backward()
        return {name: p.grad_batch for name, p in extended.named_parameters()}

    return run


def bench(device: torch.device) -> None:
    images, labels = load_digits()
    images, labels = images.to(device), labels.to(device)
    x, y = images[:BATCH], labels[:BATCH]
    train = build_model("resnet_bn").to(device).train()
    evaluate = copy.deepcopy(train).eval()
    n_params = sum(p.numel() for p in train.parameters())

    def plain_step() -> None:
        train.zero_grad(set_to_none=True)
        F.cross_entropy(train(x), y).backward()

    def per_example(chunk: int = BATCH) -> dict[str, torch.Tensor]:
        return per_example_grads(evaluate, x, y, chunk_size=chunk)

    run_backpack = _backpack(evaluate, x, y)
    if device.type == "cpu":
        _mmap_threshold(64 * 1024)
    mem_plain = _peak_extra_bytes(plain_step, device)
    mem_per_example = _peak_extra_bytes(per_example, device)
    mem_chunked = _peak_extra_bytes(lambda: per_example(CHUNK), device)
    mem_backpack = None if run_backpack is None else _peak_extra_bytes(run_backpack, device)
    ideal = mem_plain + BATCH * n_params * 4
    if device.type == "cpu":
        _mmap_threshold(32 * 2**20)
    t_plain = _time(plain_step, device)
    t_per_example = _time(per_example, device)
    t_chunked = _time(lambda: per_example(CHUNK), device)

    full_x, full_y = images, labels
    full = copy.deepcopy(train)

    def full_batch() -> None:
        full.zero_grad(set_to_none=True)
        F.cross_entropy(full(full_x), full_y).backward()

    loader = DataLoader(TensorDataset(full_x, full_y), batch_size=BATCH)
    t_full = _time(full_batch, device, repeats=3)
    result = {}
    t_streamed = _time(lambda: result.setdefault("g", streamed_population_gradient(train, loader)), device, repeats=3)
    g = result["g"]
    t_backpack = None if run_backpack is None else _time(run_backpack, device)

    print(f"device {device} ({torch.get_num_threads()} CPU threads), resnet_bn with {n_params} parameters, batch {BATCH}")
    print(f"  plain training step               {t_plain * 1e3:9.2f} ms")
    print(f"  per-example grads (torch.func)    {t_per_example * 1e3:9.2f} ms   ratio {t_per_example / t_plain:6.2f}x  (target <= 2x on CUDA)")
    print(
        f"  peak extra memory: plain {mem_plain / 2**20:.1f} MiB, per-example {mem_per_example / 2**20:.1f} MiB, "
        f"ideal plain + B*params*4 = {ideal / 2**20:.1f} MiB   ratio {mem_per_example / ideal:6.2f}  (target ~1)"
    )
    print(
        f"  per-example grads in chunks of {CHUNK}  {t_chunked * 1e3:9.2f} ms   ratio {t_chunked / t_plain:6.2f}x   "
        f"peak extra {mem_chunked / 2**20:.1f} MiB   memory ratio {mem_chunked / ideal:6.2f}"
    )
    print(f"  full-batch fwd-bwd, N={len(full_x)}        {t_full * 1e3:9.2f} ms")
    print(
        f"  streamed g* (chunks of {BATCH}, {g.passes} passes for L={g.levels})  {t_streamed * 1e3:9.2f} ms   "
        f"ratio {t_streamed / t_full:6.2f}x"
    )
    if run_backpack is None:
        print("  BackPACK: not installed (pip install backpack-for-pytorch)")
        return
    ours, theirs = per_example(), run_backpack()
    theirs = {k: v * BATCH for k, v in theirs.items()}  # BackPACK scales by 1/B for a mean loss
    gap = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    scale = max(float(v.abs().max()) for v in ours.values())
    print(
        f"  BackPACK BatchGrad (eval-mode BN) {t_backpack * 1e3:9.2f} ms   ratio {t_backpack / t_plain:6.2f}x   "
        f"peak extra {mem_backpack / 2**20:.1f} MiB   max |ours - BackPACK| {gap:.1e} (max |grad| {scale:.1e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    threads = parser.parse_args().threads
    if threads:
        torch.set_num_threads(threads)
    bench(torch.device("cpu"))
    if torch.cuda.is_available():
        bench(torch.device("cuda"))
    else:
        print("CUDA: not available on this machine")


if __name__ == "__main__":
    main()
