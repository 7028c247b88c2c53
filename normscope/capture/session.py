"""``normscope.capture``: record every normalization site of a model during forward/backward."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.nn.utils.parametrizations import _WeightNorm
from torch.overrides import TorchFunctionMode

from normscope.capture.functional import FUNCTIONAL_NORMS, RELU_FUNCTIONS, bind_call, on_parameter
from normscope.capture.record import Site, SiteRecord, batch_norm_node, finish_reductions, kernel_sums, partial_sums, to_host
from normscope.capture.sites import find_unrecognized, matches, module_sites
from normscope.capture.verify import Reading, Verification, apply_reading, pre_activation, read_by_behaviour, verify
from normscope.errors import InvalidArgumentError, UnknownNameError
from normscope.guard import preserved
from normscope.registry import Layout

STORAGES = ("device", "cpu", "reductions")


class _FunctionalCalls(TorchFunctionMode):
    """Routes ``F.batch_norm``/``F.layer_norm``/... calls made outside site modules to the capture."""

    def __init__(self, capture: "Capture") -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FUNCTIONAL_NORMS and not self.capture._inside_site_module():
            return self.capture._functional_call(func, args, kwargs)
        if func in RELU_FUNCTIONS and args:
            self.capture._note_consumer(args[0], "relu", "relu")
        return func(*args, **kwargs)


class Capture:
    """Context manager that records every normalization site of ``model`` while the block runs.

    For each call of a site: input ``x``, output ``y`` and, after backward, ``dL/dy`` and
    ``dL/dx`` (the gradient through this site only); ``z`` and ``dL/dz = gamma * dL/dy`` are
    derived from them (``record.z_rows()``, ``record.g_rows()``, recomputed in float64).

    Args:
        model: any ``nn.Module``; sites are torch's norm modules, registered or structurally
            recognised custom classes, weight-norm parametrizations and (``functional=True``)
            ``F.batch_norm``/``layer_norm``/``group_norm``/``instance_norm``/``rms_norm`` calls.
        sites: fnmatch pattern(s) on site names, e.g. ``"*bn*"``. Default: all.
        kinds: kind name(s), e.g. ``"batchnorm"``. Default: all.
        storage: ``"device"`` keeps tensors where they are, ``"cpu"`` copies them to host memory,
            ``"reductions"`` keeps only per-partition sums (see :func:`finish_reductions`), complete after the block;
            a training-mode BatchNorm's come from its kernel's own saved statistics and parameter
            gradients, with one pass over dL/dy (:func:`~normscope.capture.record.kernel_sums`).
            Default: ``"device"``.
        functional: also capture functional norm calls. Default: True.
        links: record each site's ``producer`` and ``consumer`` (hooks on every module of the
            model). ``False`` (with ``functional=False`` and ``graph=False``) leaves them ``None`` and
            hooks only the site modules: the training monitor's lighter per-step capture. Default: True.
        preserve: restore the model's parameters, buffers, flags and ``.grad`` on exit, so the
            block leaves the model bit-identical (BN running statistics included); inside it the
            user's ``.grad`` tensors are set aside, so a ``backward()`` does not accumulate into
            them (see :func:`normscope.guard.preserved`). Set False to
            keep the effects of a training step taken inside the block. Default: True.

    After the block: ``records`` (one :class:`SiteRecord` per call of a site, in forward
    order), ``sites`` (the sites that ran, in order of first call), ``unrecognized`` (norm-like
    classes that were not recorded), ``unverified`` (sites whose reading did not reproduce their
    output on the first call and that no candidate reading reproduces, :mod:`normscope.capture.verify`;
    they are not recorded), ``read_by_behaviour`` (site name -> the check of the candidate reading
    that reproduced a custom class's output where its first reading did not; kept for the
    capture's life, and used for the site's later calls).

    The same capture can be entered again (one block per training step, as
    :class:`normscope.Monitor` does): each block starts new ``records``, ``sites`` and
    ``unverified``; the model's modules are read on the first entry, and a site's reading once
    verified is not checked again while its input shape, dtype and reading stay the same.

    Example:
        >>> with normscope.capture(model, sites="*bn*") as cap:
        ...     loss_fn(model(x), y).backward()
        >>> cap["layer1.0.bn1"].g_rows().shape
    """

    def __init__(
        self,
        model: nn.Module,
        sites: str | Iterable[str] | None = None,
        kinds: str | Iterable[str] | None = None,
        storage: str = "device",
        functional: bool = True,
        preserve: bool = True,
        graph: bool = False,
        links: bool = True,
    ) -> None:
        if storage not in STORAGES:
            raise UnknownNameError("storage", storage, STORAGES)
        self.model, self.selection, self.kinds = model, sites, kinds
        self.storage, self.functional, self.preserve, self.graph = storage, functional, preserve, graph
        # without links (and without functional calls or the graph) no global module hook is installed
        self.links = links or functional or graph
        self._leaf_outputs: dict[int, tuple[str, torch.Tensor]] = {}  # graph: leaf module outputs of the block
        self._site_nodes: dict[Any, str] = {}  # graph: autograd node of each site output -> site name
        self.records: list[SiteRecord] = []
        self.sites: list[Site] = []
        self._handles: list[Any] = []
        self._mode: _FunctionalCalls | None = None
        self._state = None
        self._stack: list[tuple[str, nn.Module]] = []
        self._site_modules: set[int] = set()
        self._producers: dict[int, str] = {}
        self._pending: list[tuple[torch.Tensor, SiteRecord]] = []
        self._node_hooks: list[Any] = []  # reductions: hooks on BatchNorm kernels' autograd nodes, removed on exit
        self._partial: list[tuple[SiteRecord, dict[str, torch.Tensor]]] = []  # reductions: partial_sums of the block
        self._call_counts: dict[str, int] = {}
        self._record_counts: dict[str, int] = {}
        self._open: dict[int, SiteRecord] = {}
        self._awaiting_dx: set[int] = set()
        self._modules: dict[int, tuple[str, nn.Module, bool, str]] = {}
        self._table: list[tuple[str, nn.Module, Any]] | None = None
        self._readings: dict[str, tuple] = {}
        self._chosen: dict[str, Reading] = {}
        self.unverified: list[Verification] = []
        self.read_by_behaviour: dict[str, Verification] = {}

    @property
    def unrecognized(self) -> list[tuple[str, str]]:
        """``(module path, class name)`` of norm-like modules this capture does not record; a module
        whose forward made a functional norm call that was read (OLMo's ``OlmoLayerNorm`` calls
        ``F.layer_norm``) is read through that call and is not listed."""
        owners = {s.name.rsplit(":", 1)[0] for s in self.sites if s.functional}
        owners |= {c.site.rsplit(":", 1)[0] for c in self.unverified if c.module_type.startswith("F.")}
        return [(path, cls) for path, cls in find_unrecognized(self.model) if path not in owners]

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        if self._handles:
            raise InvalidArgumentError("this capture is already active: a capture's blocks cannot be nested")
        self.records, self.sites, self.unverified = [], [], []
        self._record_counts, self._call_counts = {}, {}
        self._open, self._awaiting_dx, self._stack, self._partial = {}, set(), [], []
        self._state = preserved(self.model, rng=False) if self.preserve else None
        if self._state is not None:
            self._state.__enter__()
        try:
            self._install()
        except BaseException:
            self._remove()
            if self._state is not None:
                self._state.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._remove()
            if self.storage == "reductions":
                unreduced = [(record, partial_sums(record)) for record in self.records if record.x is not None]
                finish_reductions(self._partial + unreduced)
                self._partial = []
                to_host(self.records)
        finally:
            if self._state is not None:
                self._state.__exit__(None, None, None)

    def _install(self) -> None:
        if self._table is None:
            self._table = [(name, module, recognized) for name, module, recognized in module_sites(self.model)
                           if matches(name, recognized.kind.name, self.selection, self.kinds)]
            self._site_modules = {id(module) for _, module, _ in self._table}
            self._modules = {
                id(m): (path, m, next(m.children(), None) is None, type(m).__name__)
                for path, m in self.model.named_modules()
            }
        for name, module, recognized in self._table:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, recognized)))
            self._handles.append(module.register_forward_hook(self._post_hook()))
        if self.links:
            self._handles.append(register_module_forward_pre_hook(self._push))
            self._handles.append(register_module_forward_hook(self._pop))
        if self.functional:
            self._mode = _FunctionalCalls(self)
            self._mode.__enter__()

    def _remove(self) -> None:
        for handle in self._handles + self._node_hooks:
            handle.remove()
        self._handles.clear()
        self._node_hooks.clear()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._pending.clear()
        self._producers.clear()
        self._leaf_outputs.clear()
        self._site_nodes.clear()

    # -- module stack, producers and consumers ---------------------------------------------
    def _push(self, module: nn.Module, args: tuple) -> None:
        """Global pre-hook: track the stack of running modules of this model, and consumers."""
        entry = self._modules.get(id(module))
        if entry is None:
            return
        path, _, is_leaf, type_name = entry
        if not self._stack:
            self._call_counts.clear()
            self._producers.clear()
            self._leaf_outputs.clear()
            self._site_nodes.clear()
        if is_leaf and self._pending and args and isinstance(args[0], torch.Tensor):
            self._note_consumer(args[0], path, type_name)
        self._stack.append((path, module))

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Global hook: leave the module and remember which module produced ``output``."""
        entry = self._modules.get(id(module))
        if entry is None:
            return
        if self._stack and self._stack[-1][1] is module:
            self._stack.pop()
        if isinstance(output, torch.Tensor):
            self._producers[id(output)] = entry[0]
            if self.graph and entry[2]:
                self._leaf_outputs[id(output)] = (entry[0], output)

    def _note_consumer(self, tensor: torch.Tensor, path: str, type_name: str) -> None:
        for y, record in self._pending:
            if tensor is y:
                record.consumer, record.consumer_type = path, type_name
        self._pending = [(y, r) for y, r in self._pending if r.consumer is None]

    def _inside_site_module(self) -> bool:
        return bool(self._stack) and id(self._stack[-1][1]) in self._site_modules

    # -- recording -------------------------------------------------------------------------
    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True) if self.storage == "cpu" else t.detach().clone()

    def _begin(self, site: Site, layout: Layout, x: torch.Tensor) -> tuple[SiteRecord, torch.Tensor]:
        if site.name not in self._record_counts:
            self.sites.append(site)
        index = self._record_counts.get(site.name, 0)
        self._record_counts[site.name] = index + 1
        layout.weight = None if layout.weight is None else layout.weight.detach().clone()
        layout.bias = None if layout.bias is None else layout.bias.detach().clone()
        record = SiteRecord(site, index, layout, x.shape, x.dtype, torch.is_grad_enabled(),
                            producer=self._producers.get(id(x)))
        if self.graph:
            leaf = self._leaf_outputs.get(id(x))
            record.feeder = leaf[0] if leaf is not None and leaf[1] is x else None
            record.upstream = None if not torch.is_grad_enabled() else _upstream(x, self._site_nodes) if x.grad_fn is not None else ()
        # autograd refuses in-place changes of an input the norm saved for backward, so a
        # reference is safe there; otherwise keep a copy
        protected = record.grad_enabled and x.requires_grad
        record.x = x.detach() if self.storage == "reductions" or (protected and self.storage == "device") else self._keep(x)
        self.records.append(record)
        if record.grad_enabled and x.requires_grad and self.storage != "reductions":
            self._awaiting_dx.add(id(record))
            x = x.view_as(x)
            x.register_hook(self._dx_hook(record))
        return record, x

    def _verified(self, record: SiteRecord, y: Any, module: nn.Module | None = None) -> bool:
        """On a site's first call, check its reading against its output unless this capture
        verified the same reading on the same input shape before. A module whose reading fails is
        read by behaviour (:func:`~normscope.capture.verify.read_by_behaviour`); the site is
        dropped when no reading reproduces its output."""
        reading = _reading(record)
        name = record.site.name
        if record.index > 0 or self._readings.get(name) == reading:
            return True
        chosen = self._chosen.get(name)
        check = verify(name, record.site.module_type, record.layout, record.x, y, chosen and chosen.activation)
        if not check.verified and module is not None and isinstance(y, torch.Tensor) and y.shape == record.shape:
            chosen, layout, check = read_by_behaviour(name, record.site.module_type, module, record.layout, record.x, y)
            if chosen is not None:
                record.layout, record.site.kind, record.site.reading = layout, chosen.kind, chosen.describe()
                self._chosen[name] = chosen
                self.read_by_behaviour[name] = check
        if check.verified:
            self._readings[name] = _reading(record)
            return True
        self.unverified.append(check)
        self.records.remove(record)
        self.sites = [s for s in self.sites if s.name != record.site.name]
        self._awaiting_dx.discard(id(record))
        return False

    def _dropped(self, name: str) -> bool:
        return any(check.site == name for check in self.unverified)

    def _end(self, record: SiteRecord, y: torch.Tensor) -> None:
        activation = record.layout.activation
        if activation is None:
            if self.storage != "reductions":
                record.y = self._keep(y)
            if self.links:
                self._pending.append((y, record))
        else:  # a fused activation follows inside the module: the record holds y before it
            if self.storage != "reductions":
                record.y = pre_activation(record.x, record.layout).to(y.dtype)
            owner = getattr(activation, "__self__", None)
            record.consumer_type = type(owner).__name__ if isinstance(owner, nn.Module) else activation.__name__
            record.consumer = f"{record.site.name} ({record.consumer_type})"
        if self.graph and y.grad_fn is not None:
            self._site_nodes[y.grad_fn] = record.site.name
        if not (record.grad_enabled and y.requires_grad):
            return
        node = batch_norm_node(y, record.layout) if self.storage == "reductions" else None
        if node is None:
            y.register_hook(self._dy_hook(record, expects_dx=id(record) in self._awaiting_dx))
        else:  # the kernel's own sums (record.kernel_sums); the hook is removed when the block ends
            self._node_hooks.append(node.register_hook(self._kernel_hook(record, node._saved_result1, node._saved_result2)))

    def _dy_hook(self, record: SiteRecord, expects_dx: bool):
        def hook(grad: torch.Tensor) -> None:
            if record.layout.activation is not None:
                grad = _through_activation(record, grad)
            record.dy = grad.detach() if self.storage != "cpu" else grad.detach().cpu()
            if self.storage == "reductions" and not expects_dx:
                self._partial.append((record, partial_sums(record)))
        return hook

    def _kernel_hook(self, record: SiteRecord, mean: torch.Tensor, invstd: torch.Tensor):
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            record.dy = grad_outputs[0].detach()
            self._partial.append((record, kernel_sums(record, mean, invstd, grad_inputs)))
        return hook

    def _dx_hook(self, record: SiteRecord):
        def hook(grad: torch.Tensor) -> None:
            record.dx = grad.detach() if self.storage != "cpu" else grad.detach().cpu()
            if self.storage == "reductions" and record.dy is not None:
                self._partial.append((record, partial_sums(record)))
        return hook

    def _pre_hook(self, name: str, recognized):
        def hook(mod, args):
            if self._dropped(name):
                return None
            index = 1 if isinstance(mod, _WeightNorm) else 0
            x = args[index]
            layout = recognized.layout(mod, x)
            if isinstance(mod, _WeightNorm):
                layout.weight = args[0]
            chosen = self._chosen.get(name)
            if chosen is not None:
                layout = apply_reading(chosen, layout, mod)
            site = Site(name, recognized.kind.name if chosen is None else chosen.kind, type(mod).__name__,
                        reading="" if chosen is None else chosen.describe())
            record, x = self._begin(site, layout, x)
            self._open[id(mod)] = record
            return (*args[:index], x, *args[index + 1 :])
        return hook

    def _post_hook(self):
        def hook(mod, args, output):
            record = self._open.pop(id(mod), None)
            if record is not None and self._verified(record, output, mod) and isinstance(output, torch.Tensor):
                self._end(record, output)
        return hook

    def _functional_call(self, func, args: tuple, kwargs: dict):
        bound = bind_call(func, args, kwargs)
        owner = self._stack[-1][0] if self._stack else ""
        fname = f"F.{func.__name__}"
        count_key = f"{owner}:{fname}"
        k = self._call_counts.get(count_key, 0)
        self._call_counts[count_key] = k + 1
        name = f"{owner or 'model'}:{fname}#{k}"
        x = bound.arguments["input"]
        if self._stack and on_parameter(x, self._stack[-1][1]):  # weight standardization: no activation site
            self._call_counts[count_key] = k
            return func(*args, **kwargs)
        layout = FUNCTIONAL_NORMS[func](bound.arguments)
        if not matches(name, layout.kind.name, self.selection, self.kinds) or self._dropped(name):
            return func(*args, **kwargs)
        record, bound.arguments["input"] = self._begin(Site(name, layout.kind.name, fname, functional=True), layout, x)
        out = func(*bound.args, **bound.kwargs)
        if self._verified(record, out):
            self._end(record, out)
        return out

    # -- reading ---------------------------------------------------------------------------
    def records_for(self, site: str) -> list[SiteRecord]:
        """All records of one site, in call order."""
        return [r for r in self.records if r.site.name == site]

    def __getitem__(self, site: str) -> SiteRecord:
        """The last record of ``site``."""
        found = self.records_for(site)
        if not found:
            raise KeyError(f"no record of site {site!r}; recorded: {', '.join(s.name for s in self.sites)}")
        return found[-1]


def _upstream(x: torch.Tensor, site_nodes: dict) -> tuple[str, ...]:
    """The sites whose output nodes (``site_nodes``) the autograd graph of ``x`` reaches first:
    a breadth-first walk from ``x.grad_fn`` that stops at every site output."""
    found: dict[str, None] = {}
    seen = {x.grad_fn}
    frontier = [x.grad_fn]
    while frontier:
        node = frontier.pop()
        name = site_nodes.get(node)
        if name is not None:
            found[name] = None
            continue
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return tuple(found)


def _through_activation(record: SiteRecord, grad: torch.Tensor) -> torch.Tensor:
    """``dL/dy`` before a fused activation from ``dL/d act(y)``: the activation's vector-Jacobian
    product at ``y`` recomputed from the record's input (float64, then the gradient's dtype)."""
    y = pre_activation(record.x, record.layout).to(grad.device)
    _, vjp = torch.func.vjp(record.layout.activation, y)
    return vjp(grad.detach().to(torch.float64))[0].to(grad.dtype)


def _reading(record: SiteRecord) -> tuple:
    """What a verification depends on besides the values: the site's module type, its input's
    shape, dtype and device, and the reading (everything of the layout but its tensors' values)."""
    layout = record.layout
    shapes = tuple(None if t is None else t.shape for t in (layout.weight, layout.bias, layout.running_mean))
    return (record.site.module_type, record.shape, record.dtype, None if record.x is None else record.x.device,
            layout.kind.name, layout.rule, layout.eps, layout.weight_offset, layout.normalized_ndim, layout.groups,
            layout.dim, layout.batch_stats, shapes, record.site.reading)


capture = Capture
"""``normscope.capture(model, ...)``: the public, function-style name of :class:`Capture`."""
