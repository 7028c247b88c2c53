"""Real third-party models: transformers families built from tiny configs (no download), each run
through ``normscope.analyze`` with its natural dict batch and loss preset, in float64."""

from __future__ import annotations

import pytest
import torch

import normscope
from normscope.capture.sites import module_sites
from normscope.errors import DataShapeError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

N, T, V = 8, 8, 32  # examples, tokens, vocabulary
LM = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=1, max_position_embeddings=32)


def tokens(labels: str | None = None, classes: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones_like(ids)
    mask[: N // 2, -2:] = 0  # padding on half the batch
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels == "class":
        batch["labels"] = torch.randint(0, classes, (N,), generator=g)
    if labels == "tokens":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def pixels(channels: int = 3, size: int = 32, classes: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(N, channels, size, size, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, classes, (N,), generator=g)}


def segmentation() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(N, 3, 16, 16, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, 3, (N, 16, 16), generator=g)}


def audio() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_values": torch.randn(N, 400, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, 3, (N,), generator=g)}


def vision(**extra) -> dict:
    return dict(image_size=32, num_channels=3, num_labels=3, **extra)


# family: (model class, config, batch, loss preset, norm classes, gls identity tolerance, why loosened)
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", lambda: transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32),
             lambda: tokens(), "lm", {"LayerNorm"}, 1e-6, ""),
    "bert": ("BertForSequenceClassification", lambda: transformers.BertConfig(num_labels=3, **{k: v for k, v in LM.items() if k != "num_key_value_heads"}),
             lambda: tokens("class"), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "distilbert": ("DistilBertForSequenceClassification", lambda: transformers.DistilBertConfig(vocab_size=V, dim=16, hidden_dim=32, n_layers=1, n_heads=2, max_position_embeddings=32, num_labels=3),
                   lambda: tokens("class"), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "t5": ("T5ForConditionalGeneration", lambda: transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0),
           lambda: tokens("tokens"), "model", {"T5LayerNorm"}, 1e-6, ""),
    "llama": ("LlamaForCausalLM", lambda: transformers.LlamaConfig(**LM), lambda: tokens(), "lm", {"LlamaRMSNorm"},
              1e-6, ""),
    "qwen2": ("Qwen2ForCausalLM", lambda: transformers.Qwen2Config(**LM), lambda: tokens(), "lm", {"Qwen2RMSNorm"}, 1e-6, ""),
    "mistral": ("MistralForCausalLM", lambda: transformers.MistralConfig(**LM), lambda: tokens(), "lm", {"MistralRMSNorm"}, 1e-6, ""),
    "vit": ("ViTForImageClassification", lambda: transformers.ViTConfig(**vision(patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
            lambda: pixels(), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "swin": ("SwinForImageClassification", lambda: transformers.SwinConfig(**vision(patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)),
             lambda: pixels(), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "convnext": ("ConvNextForImageClassification", lambda: transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
                 lambda: pixels(), "cross_entropy", {"ConvNextLayerNorm", "LayerNorm"}, 1e-6, ""),
    "resnet": ("ResNetForImageClassification", lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3),
               lambda: pixels(), "cross_entropy", {"BatchNorm2d"}, 1e-6, ""),
    "regnet": ("RegNetForImageClassification", lambda: transformers.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3),
               lambda: pixels(), "cross_entropy", {"BatchNorm2d"}, 1e-6, ""),
    "wav2vec2": ("Wav2Vec2ForSequenceClassification", lambda: transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
        conv_kernel=(10, 3), feat_extract_norm="group", num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=3,
        mask_time_prob=0.0), lambda: audio(), "cross_entropy", {"GroupNorm", "LayerNorm", "_WeightNorm"}, 1e-6, ""),
    # custom norm classes read by behaviour, fused norms, 1+w RMSNorms, q/k norms, weight standardization
    "cohere": ("CohereForCausalLM", lambda: transformers.CohereConfig(**LM), lambda: tokens(), "lm", {"CohereLayerNorm"}, 1e-6, ""),
    "gemma": ("GemmaForCausalLM", lambda: transformers.GemmaConfig(**LM, head_dim=8), lambda: tokens(), "lm", {"GemmaRMSNorm"}, 1e-6, ""),
    "qwen3": ("Qwen3ForCausalLM", lambda: transformers.Qwen3Config(**LM, head_dim=8), lambda: tokens(), "lm", {"Qwen3RMSNorm"}, 1e-6, ""),
    "olmo": ("OlmoForCausalLM", lambda: transformers.OlmoConfig(**LM), lambda: tokens(), "lm", {"F.layer_norm"}, 1e-6, ""),
    "olmo2": ("Olmo2ForCausalLM", lambda: transformers.Olmo2Config(**LM), lambda: tokens(), "lm", {"Olmo2RMSNorm"}, 1e-6, ""),
    "bit": ("BitForImageClassification", lambda: transformers.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2, num_labels=3),
            lambda: pixels(size=16), "cross_entropy", {"BitGroupNormActivation"}, 1e-6, ""),
    # batches beyond (inputs, labels): a flag for the model's own loss, dense labels
    "clip": ("CLIPModel", lambda: transformers.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8), lambda: {**tokens(), "pixel_values": pixels(size=16)["pixel_values"], "return_loss": True}, "model", {"LayerNorm"}, 1e-6, ""),
    "segformer": ("SegformerForSemanticSegmentation", lambda: transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2], decoder_hidden_size=16, num_labels=3),
        lambda: segmentation(), None, {"LayerNorm", "BatchNorm2d"}, 1e-3, "float32"),
    # more of the common families
    "roberta": ("RobertaForSequenceClassification", lambda: transformers.RobertaConfig(num_labels=3, pad_token_id=0, **{k: v for k, v in LM.items() if k != "num_key_value_heads"}),
                lambda: tokens("class"), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "albert": ("AlbertForSequenceClassification", lambda: transformers.AlbertConfig(num_labels=3, embedding_size=8, **{k: v for k, v in LM.items() if k != "num_key_value_heads"}),
               lambda: tokens("class"), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "electra": ("ElectraForSequenceClassification", lambda: transformers.ElectraConfig(num_labels=3, embedding_size=8, **{k: v for k, v in LM.items() if k != "num_key_value_heads"}),
                lambda: tokens("class"), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "opt": ("OPTForCausalLM", lambda: transformers.OPTConfig(vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16),
            lambda: tokens(), "lm", {"LayerNorm"}, 1e-6, ""),
    "gpt_neox": ("GPTNeoXForCausalLM", lambda: transformers.GPTNeoXConfig(**{k: v for k, v in LM.items() if k != "num_key_value_heads"}),
                 lambda: tokens(), "lm", {"LayerNorm"}, 1e-6, ""),
    "bloom": ("BloomForCausalLM", lambda: transformers.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2),
              lambda: tokens(), "lm", {"LayerNorm"}, 1e-6, ""),
    "phi": ("PhiForCausalLM", lambda: transformers.PhiConfig(**LM), lambda: tokens(), "lm", {"LayerNorm"}, 1e-6, ""),
    "deit": ("DeiTForImageClassification", lambda: transformers.DeiTConfig(**vision(patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
             lambda: pixels(), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "poolformer": ("PoolFormerForImageClassification", lambda: transformers.PoolFormerConfig(num_labels=3, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]),
                   lambda: pixels(), "cross_entropy", {"PoolFormerGroupNorm"}, 1e-6, ""),
    "dinov2": ("Dinov2ForImageClassification", lambda: transformers.Dinov2Config(**vision(patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)),
               lambda: pixels(), "cross_entropy", {"LayerNorm"}, 1e-6, ""),
    "hubert": ("HubertForSequenceClassification", lambda: transformers.HubertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
        conv_kernel=(10, 3), feat_extract_norm="group", num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=3,
        mask_time_prob=0.0), lambda: audio(), "cross_entropy", {"GroupNorm", "LayerNorm", "_WeightNorm"}, 1e-6, ""),
    "mobilevit": ("MobileViTForImageClassification", lambda: transformers.MobileViTConfig(
        image_size=16, num_labels=3, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2, patch_size=2),
        lambda: pixels(size=16), "cross_entropy", {"BatchNorm2d", "LayerNorm"}, 1e-3, "float32"),
    "efficientnet": ("EfficientNetForImageClassification", lambda: transformers.EfficientNetConfig(
        image_size=32, num_labels=3, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
        lambda: pixels(size=32), "cross_entropy", {"BatchNorm2d"}, 1e-3, "float32"),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", lambda: transformers.MobileNetV2Config(num_labels=3, image_size=16, depth_multiplier=0.25),
                     lambda: pixels(size=16), "cross_entropy", {"BatchNorm2d"}, 1e-3, "float32"),
    "convnextv2": ("ConvNextV2ForImageClassification", lambda: transformers.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
                   lambda: pixels(), "cross_entropy", {"ConvNextV2LayerNorm", "LayerNorm"}, 1e-6, ""),
}


# convolution-heavy families run in float32: torch's float64 depthwise convolutions on CPU are
# 30-100x slower (MobileNetV2 took 490 s in float64 on a loaded machine); float32 also exercises
# verification at float32 rounding (constant channels, 1x1 maps)
FLOAT32 = {"mobilevit", "efficientnet", "mobilenet_v2", "segformer"}


# the readings found by behaviour (where the class's first reading did not reproduce its output)
READ_BY_BEHAVIOUR = {"cohere": {"layernorm/sample_last"}, "bit": {"groupnorm/group, then activation"}}


def build(family: str):
    cls, config, batch, loss, norms, tol, why = FAMILIES[family]
    torch.manual_seed(0)
    dtype = torch.float32 if family in FLOAT32 else torch.float64
    return getattr(transformers, cls)(config()).to(dtype), batch(), loss, norms, tol


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_with_its_natural_batch_every_site_verified(family):
    """Every analyzer that applies runs (a one-second budget cuts their work, not their running)."""
    model, batch, loss, norms, tol = build(family)
    before, training = state(model)
    result = normscope.analyze(model, batch, loss_fn=loss, batch_size=4, batches=1, budget=1.0)
    found = {row["name"] for row in result.meta["sites"]}
    expected = {name for name, module, _ in module_sites(model)}
    assert expected <= found, f"sites not found: {expected - found}"
    assert {row["module_type"] for row in result.meta["sites"]} == norms
    assert result.meta["unverified"] == []
    assert {row["reading"] for row in result.meta["sites"] if "reading" in row} == READ_BY_BEHAVIOUR.get(family, set())
    # named like a norm but holding none: reported (never silently dropped), and it is no site
    reported = {row["module_type"] for row in result.meta["unrecognized"]}
    assert reported == {"wav2vec2": {"Wav2Vec2NoLayerNormConvLayer"}, "hubert": {"HubertNoLayerNormConvLayer"}}.get(family, set())
    assert result.meta["loss_fn"] == (loss or "model") and result.meta["analyzer_errors"] == {}
    assert result.meta["analyzers"] == ["stats", "gls", "bias", "descent", "dead"]
    sites = result.tables["gls_sites"]
    assert set(sites["site"]) == found
    assert (sites["identity_rel_max"] <= tol).all(), sites[["site", "identity_rel_max"]]
    after, still = state(model)
    assert still == training and after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_convnext_real_subclass_is_read_per_instance():
    """transformers' ConvNextLayerNorm subclasses nn.LayerNorm; channels-first instances normalize
    over dim 1, which the torch class lookup alone would read over the last dim."""
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

    assert issubclass(ConvNextLayerNorm, torch.nn.LayerNorm)
    first = ConvNextLayerNorm(6, eps=1e-6, data_format="channels_first").double()
    last = ConvNextLayerNorm(6, eps=1e-6, data_format="channels_last").double()
    with torch.no_grad():
        first.weight.uniform_(0.5, 1.5), first.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    with normscope.capture(torch.nn.Sequential(first)) as cap:
        y = first(x)
    record = cap["0"]
    assert record.layout.rule == "sample_channel" and cap.unverified == []
    assert record.z_rows().shape == (2 * 5 * 4, 6)
    z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(record.z_rows(), z.movedim(1, -1).reshape(-1, 6), rtol=0, atol=1e-12)
    torch.testing.assert_close(y, z * first.weight[:, None, None] + first.bias[:, None, None])
    with normscope.capture(torch.nn.Sequential(last)) as cap:
        last(x.movedim(1, -1))
    assert cap["0"].layout.rule == "sample_last" and cap.unverified == []


def test_a_subclass_whose_forward_changes_the_partition_is_read_by_behaviour():
    """A torch LayerNorm subclass whose forward normalizes over dim 1 without saying so: the
    reading of nn.LayerNorm (over the last dim, width) applies but is wrong, so the site is read
    by behaviour as a layer norm over channels, and gls's identity holds there. (Behaviour changed
    in issue 23: the site used to be left out as unverified; tests/test_readings.py covers a class
    no reading reproduces.)"""

    class ChannelLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)

    # 4 channels and a 4 x 4 image: the torch reading (over the last dim, width) applies but is wrong
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), ChannelLayerNorm(4), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 16, 10)).double()
    result = normscope.analyze(model, analyzers="stats,gls", batch_size=16, batches=1, budget=None)
    assert result.meta["unverified"] == []
    assert set(result.tables["gls_sites"]["site"]) == {"1", "2"}
    assert result.tables["gls_sites"]["identity_rel_max"].max() <= 1e-9
    with normscope.capture(model) as cap:
        model(torch.randn(3, 1, 8, 8, dtype=torch.float64))
    assert cap["1"].layout.rule == "sample_channel" and cap.read_by_behaviour["1"].reading.startswith("layernorm/sample_channel")


def test_bad_input_gets_one_line_naming_what_fits():
    model, batch, _, _, _ = build("bert")
    with pytest.raises(DataShapeError, match=r"loss lm does not fit model outputs SequenceClassifierOutput\(logits \(4, 3\)\).*presets that fit: cross_entropy, model"):
        normscope.analyze(model, batch, analyzers="stats", loss_fn="lm", batch_size=4, batches=1)
    with pytest.raises(DataShapeError, match="the dict batch lacks input_ids"):
        normscope.analyze(model, {"attention_mask": batch["attention_mask"], "labels": batch["labels"]}, analyzers="stats", batch_size=4)
    with pytest.raises(DataShapeError, match="the model loss needs a batch with labels"):
        normscope.analyze(model, {"input_ids": batch["input_ids"]}, analyzers="stats", loss_fn="model", batch_size=4)
