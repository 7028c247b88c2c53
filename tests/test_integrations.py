"""Lightning and Hugging Face Trainer callbacks: real short training runs, bit-identical with and without."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.data import load_digits
from normscope.models import build_model
from normscope.monitor.metrics import GLS_METRICS


def _state(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    for i, state in enumerate(optimizer.state.values()):
        out.update({f"o{i}:{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def _lightning_run(tmp_path, monitored: bool) -> tuple[dict, object]:
    lightning = pytest.importorskip("lightning")
    from normscope.integrations.lightning import NormscopeCallback

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(build_model("mlp_bn"), nn.Dropout(0.2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    lightning.seed_everything(0, verbose=False)
    images, labels = load_digits()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:256], labels[:256]), batch_size=32,
                                       shuffle=True, generator=torch.Generator().manual_seed(0))
    module = Classifier()
    callbacks = [NormscopeCallback(tmp_path / "run", every=2, every_curvature=3, curvature_layers="net.0.net.1",
                                   flush_seconds=0)] if monitored else []
    trainer = lightning.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, data)
    return _state(module, trainer.optimizers[0]), torch.get_rng_state()


def test_lightning_callback_leaves_training_bit_identical(tmp_path):
    plain, rng_plain = _lightning_run(tmp_path / "plain", monitored=False)
    watched, rng_watched = _lightning_run(tmp_path, monitored=True)
    _assert_identical(plain, watched)
    assert torch.equal(rng_plain, rng_watched)
    rows = pd.read_parquet(tmp_path / "run")
    stats = rows[rows["metric"] == "r2_mean"]
    assert sorted(set(stats["step"])) == [0, 2, 4] and set(stats["site"]) == {"net.0.net.2", "net.0.net.5"}
    assert sorted(rows.loc[rows["metric"] == "lambda_max", "step"]) == [0, 3]
    assert (rows.loc[rows["metric"] == "lr", "value"] == 0.05).all()


def _digit_tokens(n: int) -> list[dict[str, torch.Tensor]]:
    """Digits as token sequences: the 64 pixel intensities (0..16) are the token ids."""
    images, labels = load_digits()
    tokens = (images[:n].reshape(n, 64) * 16).round().long()
    return [{"input_ids": tokens[i], "labels": labels[i]} for i in range(n)]


def _transformers_run(tmp_path, monitored: bool) -> tuple[dict, object]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from normscope.integrations.transformers import NormscopeCallback

    config = transformers.BertConfig(vocab_size=17, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, num_labels=10)
    transformers.set_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True)
    callbacks = [NormscopeCallback(tmp_path / "run", every=1, every_curvature=2, flush_seconds=0, curvature_full_every=2)] if monitored else []
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_digit_tokens(128), callbacks=callbacks)
    trainer.train()
    return _state(model, trainer.optimizer), torch.get_rng_state()


def test_transformers_callback_leaves_training_bit_identical(tmp_path):
    plain, rng_plain = _transformers_run(tmp_path / "plain", monitored=False)
    watched, rng_watched = _transformers_run(tmp_path, monitored=True)
    _assert_identical(plain, watched)
    assert torch.equal(rng_plain, rng_watched)
    rows = pd.read_parquet(tmp_path / "run")
    norms = rows[rows["metric"].isin(GLS_METRICS)]
    assert sorted(set(norms["step"])) == [0, 1, 2, 3]
    assert norms["site"].nunique() == 5  # embeddings and two LayerNorms in each of the 2 layers
    assert norms.groupby(["step", "site"]).size().eq(len(GLS_METRICS)).all()
    lr = rows[rows["metric"] == "lr"].sort_values("step")["value"].tolist()
    assert len(lr) == 4 and lr[0] > lr[-1] > 0  # the Trainer's linear decay, read from its optimizer
    # curvature of the model's own loss on each even step's first micro-batch
    curvature = rows[rows["site"] == "model"].pivot_table(index="step", columns="metric", values="value")
    assert sorted(curvature.dropna(subset=["lambda_max"]).index) == [0, 2]
    assert (curvature.loc[[0, 2], ["lambda_max", "a_crit"]].abs() > 0).all().all()
    assert curvature.loc[0, "trace"] > 0 and math.isnan(curvature.loc[2, "trace"])  # every 2nd curvature step is full
    assert curvature.loc[[0, 2], "curvature_full"].tolist() == [1.0, 0.0]
