"""Passes before and after the driver (normscope.plan): forwards of the model per analyzer.

Counts every forward of the model's class (its private copies included: descent and bias work on
copies) with a global forward pre-hook, per analyzer run alone and for stats+gls together, and the
Hessian-vector products descent reports. ``--root DIR`` imports normscope from DIR (e.g. an
extracted older commit: ``git archive 366a5d8 normscope | tar -x -C /tmp/before``) for "before".

    python benchmarks/passes.py [--root DIR] [--threads N] [--budget S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=float, default=60.0)
    args = parser.parse_args()
    if args.root:
        sys.path.insert(0, args.root)
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook

    import normscope
    from normscope.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)

    def tiny_lm():
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
        torch.manual_seed(0)
        return Qwen3ForCausalLM(config).eval(), {"input_ids": torch.randint(0, 128, (16, 16))}

    models = {"mlp_bn (digits)": (lambda: (build_model("mlp_bn"), None)), "qwen3-style tiny LM": tiny_lm}
    rows = []
    for label, make in models.items():
        data = make()[1]
        for analyzers in ("stats", "gls", "stats,gls") + (("stats,gls,bias,descent",) if data is None else ()):
            model, data = make()
            kind = type(model)
            calls = [0]
            handle = register_module_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + (type(m) is kind)))
            started = time.perf_counter()
            try:
                result = normscope.analyze(model, data, analyzers=analyzers, batch_size=32 if data is None else 8,
                                           batches=2, budget=args.budget)
                spectrum = result.tables.get("descent_spectrum")
                products = int(spectrum["products"].sum()) if spectrum is not None and len(spectrum) else 0
                ran = ",".join(result.meta["analyzers"])
            except Exception as error:  # noqa: BLE001 - an analyzer set that does not apply
                products, ran = 0, f"error: {type(error).__name__}"
            finally:
                handle.remove()
            rows.append({"model": label, "analyzers": analyzers, "ran": ran, "forwards": calls[0],
                         "spectrum_products": products, "seconds": round(time.perf_counter() - started, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"load": os.getloadavg(), "threads": torch.get_num_threads(), "root": args.root or "this tree"}))


if __name__ == "__main__":
    main()
