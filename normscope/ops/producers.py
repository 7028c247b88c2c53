"""The Linear/Conv layer feeding each normalization site, read from a ``torch.fx`` trace.

"Extreme Normalization" (under review) Algorithm 1 takes the mean over the input of the layer
before the normalization (§3.3); :func:`normscope.ops.swap.swap_norms` uses :func:`feeding_layers`
to hand that layer to a :class:`~normscope.ops.population.PopulationNorm`.
"""

from __future__ import annotations

from torch import fx, nn

FEEDERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def feeding_layers(model: nn.Module, sites: list[str]) -> dict[str, str]:
    """``{site: layer}`` for each module path in ``sites`` whose only input is the output of a
    Linear/Conv module used nowhere else (torch's own modules are leaves of the trace). Empty
    when ``model`` does not trace with ``torch.fx`` (data-dependent control flow): the sites then
    have no known producer."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any trace failure means "producer unknown", never an error
        return {}
    modules = dict(model.named_modules())
    wanted = set(sites)
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or not node.args:
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
            and isinstance(modules.get(source.target), FEEDERS)
        ):
            found[node.target] = source.target
    return found
