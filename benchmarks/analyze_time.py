"""Wall time of ``normscope analyze`` on the built-in default with every analyzer, and the share
of it spent rendering the HTML report.

Runs the real command once as a subprocess (training the built-in default included), then loads
its output folder here and times :func:`normscope.reports.render.render_html` on it, best of
three. Threads are limited to ``--threads`` (default 2) in both. Target: under 60 s on 2 cores.

    python benchmarks/analyze_time.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "normscope.cli.app", "analyze", "--out", str(out), "--device", "cpu"],
                              cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"normscope analyze failed:\n{done.stderr}")
        import torch

        torch.set_num_threads(args.threads)
        from normscope.reports.render import render_html
        from normscope.result import AnalysisResult

        result = AnalysisResult.load(out)
        render_html(result)
        renders = []
        for _ in range(3):
            begun = time.perf_counter()
            render_html(result)
            renders.append(time.perf_counter() - begun)
        render = min(renders)
    seconds = result.meta["seconds"]
    print(f"threads                      {args.threads}")
    print(f"analyzers run                {', '.join(result.meta['analyzers'])}")
    print(f"analyzer errors              {result.meta['analyzer_errors'] or 'none'}")
    print(f"wall time of the command     {wall:.1f} s")
    print(f"  loading / training model   {seconds['load_model']:.1f} s")
    print(f"  analysis (in the command)  {seconds['total']:.1f} s: " + ", ".join(
        f"{name} {value:.1f} s" for name, value in seconds.items() if name not in ("total", "load_model")))
    print(f"  report rendering           {render:.2f} s")
    print(f"  everything else            {wall - seconds['load_model'] - seconds['total']:.1f} s "
          "(interpreter and imports, data, writing tables, rendering)")
    print(f"wall / target (60 s)         {wall / TARGET_SECONDS:.2f}")
    print(f"rendering / wall             {render / wall:.3f}")


if __name__ == "__main__":
    main()
