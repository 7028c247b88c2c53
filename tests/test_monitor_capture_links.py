"""The monitor's lighter per-step capture (links=False): the same reductions as a full capture,
no producer/consumer links and no global module hooks while the block runs."""

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from normscope.capture import capture
from normscope.models import build_model


def test_capture_without_links_keeps_the_same_reductions_and_installs_no_global_hook(digits32):
    x, y = digits32[0][:32], digits32[1][:32]
    model = build_model("resnet_bn").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reductions = {}
    for links in (True, False):
        model.load_state_dict(state)
        before = len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)
        with capture(model, storage="reductions", functional=False, preserve=False, links=links) as cap:
            global_hooks = len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        assert global_hooks - before == (2 if links else 0)
        assert len(cap.records) == 10
        assert all((r.producer is not None) == links for r in cap.records)
        reductions[links] = [r.reductions for r in cap.records]
    for with_links, without in zip(reductions[True], reductions[False]):
        assert with_links.keys() == without.keys()
        assert all(torch.equal(with_links[k], without[k]) for k in with_links)
