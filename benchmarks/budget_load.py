"""Wall time against the budget, quiet and under contention, on tiny held-out-style models.

Builds tiny models from transformers configs (a Gemma2-style LM, a Qwen3-style LM with q/k norms,
BLOOM, MobileViT, EfficientNet), runs ``normscope.analyze`` with default settings (batch size 128,
4 batches, quick mode, every default analyzer) and ``--budget`` seconds, and reports per model the
analysis wall time (``meta["seconds"]["total"]``, model building left out; nothing is written), its
ratio to the budget, also without the data loading before the budget starts
(``meta["seconds"]["loading"]``; the target, <= 1.1, is "plus loading and writing"), and whether every headline is present: stats and gls rows per
site, and descent's ``a_crit`` and ``lambda_max`` in train and eval mode. Each configuration of
``--contention`` (N CPU-bound busy loops started beside the analysis, ended after it) and
``--threads`` (0: torch's default count) runs every model; the machine's load (1-minute average
before and after each run) is recorded on every row, and a markdown table closes the output.

    python benchmarks/budget_load.py [--budget 120] [--contention 0,2] [--threads 0,1] [--models gemma2,qwen3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


EXAMPLES = 512
"""Examples per data set: the default 4 batches of 128."""
HEADLINES = ("a_crit_train", "lambda_max_train", "a_crit_eval", "lambda_max_eval")


def _burn() -> None:
    while True:
        sum(i * i for i in range(10_000))


def build(name: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tokens = {"input_ids": torch.randint(0, 128, (EXAMPLES, 16))}
    if name == "gemma2":
        config = tf.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
        return tf.Gemma2ForCausalLM(config), tokens
    if name == "qwen3":
        config = tf.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
        return tf.Qwen3ForCausalLM(config), tokens
    if name == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)), tokens
    images = (torch.randn(EXAMPLES, 3, 64, 64), torch.randint(0, 10, (EXAMPLES,)))
    if name == "mobilevit":
        config = tf.MobileViTConfig(image_size=64, num_labels=10, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])
        return tf.MobileViTForImageClassification(config), images
    if name == "efficientnet":
        # hidden_dim is the top convolution's width: round_filters(1280) = 320 at width 0.25 (the model does not derive it)
        config = tf.EfficientNetConfig(image_size=64, num_labels=10, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)
        return tf.EfficientNetForImageClassification(config), images
    raise ValueError(name)


def run_one(name: str, budget: float, contention: int) -> dict:
    """One analysis of model ``name`` within ``budget`` seconds, as a JSON-safe row."""
    import torch

    import normscope

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        model, data = build(name)
        result = normscope.analyze(model, data, budget=budget)
        analysis = result.meta["seconds"]["total"]
        descent = result.headline.get("descent", {})
        sites = len(result.meta["sites"])
        loading = result.meta["seconds"].get("loading", 0.0)
        row = {"model": name, "analysis_s": round(analysis, 1), "ratio": round(analysis / budget, 3),
               "ratio_after_loading": round((analysis - loading) / budget, 3),
               "descent_headline": all(k in descent for k in HEADLINES),
               "missing": [k for k in HEADLINES if k not in descent],
               "stats_gls_rows": [len(result.tables.get("stats_sites", ())), len(result.tables.get("gls_sites", ())), sites],
               "cuts": len(result.meta["budget"]["cuts"]), "pace": round(result.meta["budget"].get("pace", 1.0), 2),
               "seconds": {k: round(v, 1) for k, v in result.meta["seconds"].items()}, "errors": result.meta["analyzer_errors"],
               "threads_used": result.meta.get("threads", {}).get("threads")}
    except Exception as error:  # noqa: BLE001 - a model this version cannot analyze is a result too
        row = {"model": name, "error": f"{type(error).__name__}: {str(error)[:200]}"}
    row.update(wall_s=round(time.perf_counter() - started, 1), load=[round(load_before, 1), round(os.getloadavg()[0], 1)],
               threads=torch.get_num_threads(), contention=contention, budget=budget, cores=os.cpu_count())
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--contention", default="0,2", help="busy processes beside the analysis, one configuration each")
    parser.add_argument("--threads", default="0,1", help="torch threads (0: the default count), one configuration each")
    parser.add_argument("--models", default="gemma2,qwen3,bloom,mobilevit,efficientnet")
    parser.add_argument("--root", default=None, help="import normscope from this folder (an older tree, for 'before')")
    args = parser.parse_args()
    if args.root:
        import sys

        sys.path.insert(0, args.root)
    import torch

    default_threads = torch.get_num_threads()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        for contention in [int(c) for c in args.contention.split(",")]:
            burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(contention)]
            for process in burners:
                process.start()
            try:
                for name in args.models.split(","):
                    rows.append(run_one(name, args.budget, contention))
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                for process in burners:
                    process.terminate()
                    process.join()
    print("\n| model | threads | contention | load | analysis s | ratio | ratio after loading | every descent headline |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['threads']} | {row['contention']} | {row['load'][0]}-{row['load'][1]} | "
              f"{row.get('analysis_s', 'error')} | {row.get('ratio', row.get('error', ''))} | {row.get('ratio_after_loading', '')} | "
              f"{row.get('descent_headline', '')} {'' if row.get('descent_headline', True) else row.get('missing')} |")


if __name__ == "__main__":
    main()
