"""How normscope analyze scales: wall time and peak memory on transformers models built from
configs (no download), against one training step, and each analyzer's time against the parameter
count.

Cases (each in a fresh subprocess so that peak RSS is its own; ``--threads`` torch threads):
* ``hf_resnet``: ``ResNetForImageClassification`` (20k parameters, BatchNorm) on 8x8 digits;
* ``resnet_bn``: normscope's ``build_model("resnet_bn")`` (43k parameters) on the digits as tensors;
* ``bert``: ``BertForSequenceClassification`` (3.5M parameters, LayerNorm, dropout 0) reading
  each digit's 64 pixel intensities (0-16) as 64 tokens;
* ``sweep``: the BERT family at hidden sizes giving about 1e4 to 1e7 parameters; per analyzer
  time from ``meta["seconds"]``; the growth exponent is the least-squares slope of
  log(time) on log(parameters).

Each run is ``normscope.analyze(model, data)`` on the ``transformers`` model itself (no wrapper;
data ``({"pixel_values" | "input_ids": ...}, labels)``) with the defaults (every analyzer that
applies, budget 120 s, quick settings), batch 128, then ``result.save`` (tables, summary, report),
as ``normscope analyze`` does. Peak memory: ``ru_maxrss`` of the subprocess minus its RSS after
importing normscope's analyzers and report code, building the model and data and a first
``torch.func`` call on a 2x2 Linear (the code's own memory is not the analysis's; the RSS that
first call adds, torch's compiler stack loaded on first use, is printed as ``func code`` and the
peak with it added), against the same for one forward+backward+SGD step.
``--analyzers`` runs only those (e.g. ``bias`` for one analyzer's peak). Prints the load average
with every figure.

Run: ``python benchmarks/scale.py [--threads 2] [--cases hf_resnet,resnet_bn,bert,sweep] [--analyzers bias]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from normscope.data import load_digits


def build(case: str, hidden: int | None = None) -> tuple[nn.Module, tuple[dict | torch.Tensor, torch.Tensor]]:
    """The model as ``transformers`` builds it (no wrapper) and the data as ``({key: inputs}, labels)``;
    ``resnet_bn``: normscope's model and ``(images, labels)``."""
    images, labels = load_digits(torch.float32)
    torch.manual_seed(0)
    if case == "resnet_bn":
        from normscope.models import build_model

        return build_model("resnet_bn"), (images, labels)
    if case == "hf_resnet":
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                              num_labels=10, downsample_in_first_stage=False)
        return ResNetForImageClassification(config), ({"pixel_values": images}, labels)
    from transformers import BertConfig, BertForSequenceClassification

    hidden = hidden or 256
    config = BertConfig(vocab_size=32, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=max(1, hidden // 64),
                        intermediate_size=1152 if hidden == 256 else 4 * hidden, max_position_embeddings=64, num_labels=10,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokens = images.reshape(len(images), 64).round().long()
    return BertForSequenceClassification(config), ({"input_ids": tokens}, labels)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(case: str, what: str, hidden: int | None, threads: int, analyzers: str | None) -> None:
    torch.set_num_threads(threads)
    import normscope
    import normscope.reports.render
    from normscope.analyzers import ANALYZERS, get_analyzer

    for name in ANALYZERS:  # the code's own memory is not the analysis's
        get_analyzer(name)
    model, (inputs, y) = build(case, hidden)
    before_func = rss_mb()
    vmap(grad(lambda w, x: (x @ w).sum()), in_dims=(None, 0))(torch.ones(2, 2), torch.ones(3, 2))
    base = rss_mb()
    started = time.perf_counter()
    out = {"case": case, "what": what, "params": sum(p.numel() for p in model.parameters()), "load": os.getloadavg(),
           "func_code_mb": base - before_func}
    if what == "step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        if isinstance(inputs, dict):
            F.cross_entropy(model(**{k: v[:128] for k, v in inputs.items()}).logits, y[:128]).backward()
        else:
            F.cross_entropy(model(inputs[:128]), y[:128]).backward()
        optimizer.step()
    else:
        result = normscope.analyze(model, (inputs, y), analyzers=analyzers)
        written = time.perf_counter()
        out["analysis_peak_mb_above_base"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        with tempfile.TemporaryDirectory() as folder:
            result.save(Path(folder) / "out")  # tables, summary and report, as the CLI writes them
        out["writing_seconds"] = time.perf_counter() - written
        out["seconds_by_analyzer"] = result.meta["seconds"]
        out["analyzers"] = result.meta["analyzers"]
        out["skipped"] = result.meta["analyzer_errors"]
        out["cuts"] = [f"{c['analyzer']}: {c['what']}" for c in result.meta["budget"]["cuts"]]
        out["unit_costs"] = result.meta["budget"]["unit_costs"]
    out["seconds"] = time.perf_counter() - started
    out["peak_mb_above_base"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    out["load_after"] = os.getloadavg()
    print(json.dumps(out))


def run(case: str, what: str, threads: int, hidden: int | None = None, analyzers: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", case, what, str(hidden or 0), "--threads", str(threads)]
    command += ["--analyzers", analyzers] if analyzers else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="hf_resnet,bert,sweep")
    parser.add_argument("--child", nargs=3, default=None)
    parser.add_argument("--hidden", default="8,32,128,256,512")
    parser.add_argument("--analyzers", default=None, help="comma-separated analyzers (default: all that apply)")
    args = parser.parse_args()
    if args.child:
        case, what, hidden = args.child
        child(case, what, int(hidden) or None, args.threads, args.analyzers)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    for case in [c for c in args.cases.split(",") if c != "sweep"]:
        step, full = run(case, "step", args.threads), run(case, "analyze", args.threads, analyzers=args.analyzers)
        print(f"{case}: {full['params']} parameters; analyze {full['seconds']:.1f} s {full['seconds_by_analyzer']} "
              f"(ran {full['analyzers']}, writing {full['writing_seconds']:.1f} s, cuts {full['cuts']}, unit costs {full['unit_costs']}); peak memory above base "
              f"{full['peak_mb_above_base']:.0f} MB vs training step {step['peak_mb_above_base']:.0f} MB = "
              f"{full['peak_mb_above_base'] / max(step['peak_mb_above_base'], 1):.2f}x (before writing {full['analysis_peak_mb_above_base']:.0f} MB; func code {full['func_code_mb']:.0f} MB; with it "
              f"{(full['peak_mb_above_base'] + full['func_code_mb']) / max(step['peak_mb_above_base'], 1):.2f}x); "
              f"load {full['load']} -> {full['load_after']}",
              flush=True)
    if "sweep" in args.cases:
        rows = [run("bert", "analyze", args.threads, int(h), args.analyzers) for h in args.hidden.split(",")]
        params = np.array([r["params"] for r in rows], float)
        for r in rows:
            print(f"  bert hidden: {r['params']} params, {r['seconds']:.1f} s, {r['seconds_by_analyzer']}, "
                  f"peak {r['peak_mb_above_base']:.0f} MB, cuts {r['cuts']}, load {r['load']}", flush=True)
        for name in sorted({n for r in rows for n in r["seconds_by_analyzer"] if n not in ("total",)}):
            times = np.array([r["seconds_by_analyzer"].get(name, np.nan) for r in rows], float)
            ok = np.isfinite(times) & (times > 0)
            if ok.sum() >= 2:
                slope = np.polyfit(np.log(params[ok]), np.log(times[ok]), 1)[0]
                print(f"  growth exponent of {name} time: {slope:.2f}")
        memory = np.array([max(r["peak_mb_above_base"], 1.0) for r in rows])
        print(f"  growth exponent of peak memory: {np.polyfit(np.log(params), np.log(memory), 1)[0]:.2f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
