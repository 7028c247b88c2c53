"""Time of rendering the HTML report / time of the analysis it shows, and the cost per section.

For each case (a reference model and the analyzers to run) runs :func:`normscope.analyze` on the
digits at batch 128, then times :func:`normscope.reports.render.render_html` on its result (best
of three) and the figures of each section. Target: rendering a small fraction of the analysis.

    python benchmarks/report_cost.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from normscope.api import analyze
from normscope.models import build_model
from normscope.reports.figures import FIGURES, render_figures
from normscope.reports.render import render_html

CASES = (("mlp_bn", "stats,gls,bias,descent"), ("resnet_bn", "stats,gls"))


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, analyzers in CASES:
        started = time.perf_counter()
        result = analyze(build_model(name), analyzers=analyzers, batch_size=128, batches=2, lr=0.1)
        analysis = time.perf_counter() - started
        render = best_of(3, lambda: render_html(result))
        size = len(render_html(result).encode()) / 1e6
        print(f"{name} ({analyzers}): analysis {analysis:.2f} s, render {render:.2f} s, "
              f"render / analysis = {render / analysis:.3f}, page {size:.2f} MB")
        for section in dict.fromkeys(spec.section for spec in FIGURES):
            started = time.perf_counter()
            drawn = [f for f in render_figures(section, result.tables) if not f.skipped]
            if drawn:
                print(f"  {section}: {len(drawn)} figures in {(time.perf_counter() - started) * 1000:.0f} ms")

if __name__ == "__main__":
    main()
