"""Wall time against the budget, quiet and under contention, on tiny held-out-style models.

Builds tiny models from transformers configs (a Gemma2-style LM, a Qwen3-style LM with q/k norms,
BLOOM, MobileViT, EfficientNet), runs ``normscope.analyze`` with default settings and ``--budget``
seconds, and reports per model the analysis wall time (``meta["seconds"]["total"]``, loading and
writing left out), its ratio to the budget (target <= 1.1) and whether descent's headline
(``a_crit_train`` and ``lambda_max_train``) is present. ``--contention N`` starts N CPU-bound
processes beside the analysis (busy loops, ended when it finishes). The machine's load is recorded.

    python benchmarks/budget_load.py [--budget 120] [--contention 2] [--threads N] [--models gemma2,qwen3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


def _burn() -> None:
    while True:
        sum(i * i for i in range(10_000))


def build(name: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tokens = {"input_ids": torch.randint(0, 128, (32, 16))}
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
    images = (torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,)))
    if name == "mobilevit":
        config = tf.MobileViTConfig(image_size=64, num_labels=10, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])
        return tf.MobileViTForImageClassification(config), images
    if name == "efficientnet":
        config = tf.EfficientNetConfig(image_size=64, num_labels=10, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=64)
        return tf.EfficientNetForImageClassification(config), images
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--contention", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="gemma2,qwen3,bloom,mobilevit,efficientnet")
    parser.add_argument("--root", default=None, help="import normscope from this folder (an older tree, for 'before')")
    args = parser.parse_args()
    if args.root:
        import sys

        sys.path.insert(0, args.root)
    import torch

    import normscope

    if args.threads:
        torch.set_num_threads(args.threads)
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.contention)]
    for process in burners:
        process.start()
    try:
        for name in args.models.split(","):
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            try:
                model, data = build(name)
                result = normscope.analyze(model, data, batch_size=16, batches=2, budget=args.budget)
                analysis = result.meta["seconds"]["total"]
                descent = result.headline.get("descent", {})
                row = {"model": name, "analysis_s": round(analysis, 1), "ratio": round(analysis / args.budget, 3),
                       "descent_headline": all(k in descent for k in ("a_crit_train", "lambda_max_train")),
                       "cuts": len(result.meta["budget"]["cuts"]), "pace": round(result.meta["budget"].get("pace", 1.0), 2),
                       "errors": result.meta["analyzer_errors"]}
            except Exception as error:  # noqa: BLE001 - a model this version cannot analyze is a result too
                row = {"model": name, "error": f"{type(error).__name__}: {str(error)[:200]}"}
            row.update(wall_s=round(time.perf_counter() - started, 1), load=[round(load_before, 1), round(os.getloadavg()[0], 1)],
                       threads=torch.get_num_threads(), contention=args.contention, budget=args.budget)
            print(json.dumps(row), flush=True)
    finally:
        for process in burners:
            process.terminate()


if __name__ == "__main__":
    main()
