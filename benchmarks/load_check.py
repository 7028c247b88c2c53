"""What loading and checking a ~10M-parameter model costs on top of the analyses: the data/loss
set-up and check_fit (one eval forward under capture, with the self-verification of every site
on its first call) against one plain forward pass of the same batch.

Prints, for a BERT of ~10M parameters (4 layers, hidden 256) on a dict batch: plain forward,
data/loss set-up, check_fit with and without the first-call verification, as forward passes (median of 5, interleaved, one
process, torch.set_num_threads(1)), with the machine load.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import transformers

from normscope.api import check_fit, make_loader, take_batches
from normscope.analyzers import no_progress
from normscope.batch import forward
from normscope.capture.session import Capture
from normscope.losses import PRESETS

transformers.logging.set_verbosity_error()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, max_position_embeddings=128, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 30000, (32, 64))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
    loss = PRESETS["cross_entropy"]
    plain, checked, setup, unverified_check = [], [], [], []
    verify_first_call = Capture._verified
    for _ in range(5):
        started = time.perf_counter()
        loader, _, _ = make_loader(data, 32, 0)
        batch = take_batches(loader, 1, torch.device("cpu"), torch.float32, no_progress, loss)[0]
        setup.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            forward(model, batch[0])
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        check_fit(model, batch, loss)
        checked.append(time.perf_counter() - started)
        Capture._verified = lambda self, record, y: True  # check_fit as before the self-verification
        started = time.perf_counter()
        try:
            check_fit(model, batch, loss)
        finally:
            Capture._verified = verify_first_call
        unverified_check.append(time.perf_counter() - started)
    p, c, s = statistics.median(plain), statistics.median(checked), statistics.median(setup)
    u = statistics.median(unverified_check)
    print(f"model: BERT, {params / 1e6:.1f}M parameters, batch 32 x 64 tokens, load {os.getloadavg()}")
    print(f"plain forward {p * 1e3:.1f} ms | data/loss set-up {s * 1e3:.1f} ms | check_fit (capture + verify) {c * 1e3:.1f} ms")
    print(f"check_fit without verification {u * 1e3:.1f} ms; verification adds {(c - u) / p:.2f} forward passes, "
          f"set-up {s / p:.3f}; check_fit in all = {c / p:.2f} forward passes (capture storage='cpu' copies included)")


if __name__ == "__main__":
    main()
