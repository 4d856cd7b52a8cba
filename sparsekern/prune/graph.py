"""Which channels of a model belong together: dependency analysis with torch.fx.

Removing output channel c of a conv is only exact if everything that carries that channel
goes with it: the BN entries after the conv, the matching input channel of every layer that
reads it, and - across residual adds - the same channel of every other layer whose output is
summed with it. This module finds those links.

The model: the traced graph is walked once with the tensor shapes of an example batch
(``ShapeProp``). Every tensor with a channel dim (dim 1) gets a *channel map*: for each of its
channels the id of an :class:`Atom`, "output channel c of layer L". Ops that keep channels
(BN, activations, pooling, dropout) pass the map on; ``torch.cat`` along dim 1 concatenates
maps; flatten repeats each atom over the H*W features it becomes; an add, sub or mul of two
channel tensors *ties* the atoms at equal positions (union-find): tied atoms can only be
removed together. A conv with ``groups > 1`` makes *derived* atoms: its output group g is
removed exactly when its whole input group g is (a depthwise conv's channels follow the
channel that feeds them). Network inputs and the outputs of ops the analysis does not
understand get *fixed* atoms, which are never removed; a planned removal that reaches such an
op is kept, and the report names the op (``prune_model(..., strict=True)`` raises
:class:`UnsupportedModelError` instead; see ``removal.py``).

Beyond one channel dim. ``split`` / ``chunk`` along channels give a SPLIT node whose parts
(``getitem``) carry ranges of its channels; a tensor slice ``x[:, a:b]`` carries a range. Their
sizes are fixed in the forward, so a removal that would shift them is kept (a slice that covers
every channel, like GhostNet's ``out[:, :self.out_chs]``, is an identity; channels after a
slice's end may go). A ``view`` that splits the channel dim into two, ``(N, C, ...) -> (N, g,
C/g, ...)``, makes a *channel grid*: the map keeps every channel's atom in row-major order and
``detail["grid"] = (g, C/g)``; ``transpose`` permutes the grid, a view / flatten back to one dim
merges it. This is a channel shuffle (torchvision's ShuffleNetV2). The pruned model runs the
same view with the size it reads from ``x.size()``, so a static size (the ``g`` groups) must stay:
the atoms that share their index along the dynamic dim are *tied* (removed together), which keeps
the grid rectangular and the permutation the same on the kept channels. A view whose channel
sizes are all hard-coded is mapped but *pins* its channels (never removed; ``detail["pin"]``).
A LayerNorm / GroupNorm that normalises over the channel dim pins its channels too (removing
one changes the statistics the others are normalised with).

A product of two channel tensors (squeeze-excitation: ``x * sigmoid(fc2(relu(fc1(pool(x)))))``)
ties its factors like an add, and marks the tie *gated* (``ChannelGraph.gated``): there a
removed channel of one factor that is 0 makes the product 0 whatever the other factor, so the
other factor's producer channel (the SE expand conv's output) may go with it although the plan
never named it (``removal.py``).

Tracing uses ``sparsekern._fx.trace_graph``: registered norm-then-activation modules (timm's
``BatchNormAct2d``: a BN followed by its elementwise activation), registered channel ops
(``registry.py``) and the user's ``leaf_modules`` are kept as single nodes; a leaf module that is
not registered is opaque (its output channels are fixed). A model torch.fx cannot trace raises
:class:`UntraceableModelError`, naming the module and suggesting ``leaf_modules``.

Each prunable layer (a Conv with ``groups == 1`` or a Linear) has a *private chain*: the ops
after it that only it feeds (``conv -> bn -> relu -> maxpool``). The chain's last node is
where a plan's statement "channel c is dead (or the constant k)" applies: in a
Conv-BN-ReLU unit, after the ReLU; for ResNet's ``bn2`` (summed with the shortcut before its
ReLU), at the BN output that enters the add.

What each op does to channels (its node kind) is decided in ``kinds.py``; this module builds
the maps, the ties and the chains from those kinds, and answers who reads a layer's channels
(:meth:`ChannelGraph.readers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

import operator

from sparsekern._fx import normalize_leaf_modules, trace_graph
from sparsekern._types import LINEARS
from sparsekern.errors import UnsupportedModelError
from sparsekern.prune import registry
from sparsekern.prune.kinds import (
    BINARY, CAT, CHAIN_KINDS, CHANNELWISE, ELEMENTWISE, FLATTEN, GETITEM, GROUPED, IDENTITY, IGNORE, INPUT, MIXING,
    OUTPUT, PERCHANNEL, POOL, PRODUCER, SHUFFLE, SPLIT, TRANSPOSE, UNKNOWN, after_norm_act, as_tuple, classify,
    constant_through, scalar_at,
)


@dataclass(frozen=True)
class Atom:
    """One removable unit: output channel ``channel`` of ``layer``.

    kind "producer": a Conv/Linear output channel (the plan decides);
    kind "derived": an output channel of a grouped conv, removed exactly when all of
    ``depends`` (its input group) are; kind "fixed": never removed (network inputs, outputs
    of ops the analysis treats as opaque).
    """

    kind: str
    layer: str
    channel: int
    depends: tuple = ()


@dataclass
class NodeInfo:
    """What the analysis knows about one fx node."""

    node: torch.fx.Node
    kind: str
    module_name: Optional[str] = None
    channels: Optional[list] = None        # atom id per channel of the output, None if no channel dim
    inputs: list = field(default_factory=list)  # the channel-tensor nodes it reads, in order
    detail: dict = field(default_factory=dict)  # kind-specific facts (see kinds.classify)

    @property
    def label(self) -> str:
        """How error messages name this node: the module, or the op and fx node name."""
        if self.module_name is not None:
            return f"module {self.module_name!r} ({self.node.name})"
        target = getattr(self.node.target, "__name__", str(self.node.target))
        return f"{self.node.op} {target!r} (fx node {self.node.name!r})"


def trace(model: nn.Module, leaf_modules=(), concrete_args=None, *, opaque_untraceable: bool = False
          ) -> torch.fx.GraphModule:
    """``sparsekern._fx.trace_graph`` with the registered channel ops as leaves (see the module
    docstring); raises UntraceableModelError (an UnsupportedModelError) naming what failed, or
    with ``opaque_untraceable`` makes the submodules that fail leaves (``gm.meta["untraceable"]``).

    The GraphModule shares ``model``'s submodules: editing them edits ``model``.
    """
    return trace_graph(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       is_leaf=registry.is_registered_leaf, opaque_untraceable=opaque_untraceable)


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return meta.shape if isinstance(meta, TensorMetadata) else None


class ChannelGraph:
    """The channel dependency graph of ``model`` (see the module docstring).

    ``example_inputs`` (a tensor or a tuple of tensors) gives the shapes; without it only the
    structure is built (kinds, private chains), enough to read BN parameters per layer.
    The model is traced in eval mode and never modified here; ``gm`` shares its submodules.
    """

    def __init__(self, model: nn.Module, example_inputs=None, *, leaf_modules=(), concrete_args=None,
                 strict: bool = False):
        self.concrete_args = concrete_args
        was_training = {name: m.training for name, m in model.named_modules()}
        model.eval()  # trace in eval mode: F.dropout(training=self.training) records False
        try:
            # Partial plans (not strict): a submodule torch.fx cannot trace is one opaque op.
            self.gm = trace(model, normalize_leaf_modules(leaf_modules), concrete_args, opaque_untraceable=not strict)
            self.leaf_modules = self.gm.meta["leaf_modules"]
            self.notes = [
                f"module {name!r} ({type(self.gm.get_submodule(name)).__name__}) cannot be traced by torch.fx "
                f"({why}): it is an opaque op and the channels that reach it are kept (pass "
                f"leaf_modules=[{name!r}] to say so, or strict=True to refuse the model)"
                for name, why in self.gm.meta["untraceable"].items()
            ]
            self.modules = dict(model.named_modules())
            # The traced model's output on the example batch: the reference of exact surgery.
            self.example_output = None
            if example_inputs is not None:
                with torch.no_grad():
                    self.example_output = ShapeProp(self.gm).propagate(*example_inputs)
        finally:
            for name, m in model.named_modules():
                m.training = was_training[name]
        self.has_shapes = example_inputs is not None
        self.atoms: list[Atom] = []
        self._parent: list[int] = []
        self.producers: dict[str, list[int]] = {}   # layer -> atom id of each output channel
        self.grouped: dict[str, NodeInfo] = {}      # grouped conv name -> its node
        self.gated: set = set()                     # atoms tied by a product of two channel tensors
        self.infos: list[NodeInfo] = []
        self.info: dict[torch.fx.Node, NodeInfo] = {}
        self._build()
        self.chains = self._private_chains()

    def retrace(self, model: nn.Module) -> torch.fx.GraphModule:
        """``model`` (e.g. the pruned copy) traced the way this graph was."""
        return trace(model, self.leaf_modules, self.concrete_args)

    # --- atoms and ties --------------------------------------------------------------------
    def _new_atom(self, atom: Atom) -> int:
        self.atoms.append(atom)
        self._parent.append(len(self._parent))
        return len(self.atoms) - 1

    def find(self, a: int) -> int:
        """The representative of ``a``'s tie class."""
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def tie_classes(self) -> dict[int, list[int]]:
        """Representative -> every atom tied to it."""
        classes: dict[int, list[int]] = {}
        for a in range(len(self.atoms)):
            classes.setdefault(self.find(a), []).append(a)
        return classes

    def tied_layers(self) -> list[list[str]]:
        """Groups of prunable layers whose output channels are tied (residual adds), each sorted."""
        groups: dict[int, set] = {}
        for members in self.tie_classes().values():
            layers = {self.atoms[a].layer for a in members if self.atoms[a].kind == "producer"}
            if len(layers) > 1:
                groups.setdefault(self.find(members[0]), set()).update(layers)
        merged: list[set] = []
        for layers in groups.values():
            for m in merged:
                if m & layers:
                    m |= layers
                    break
            else:
                merged.append(set(layers))
        return sorted(sorted(m) for m in merged)

    # --- the walk over the graph -----------------------------------------------------------
    def _build(self) -> None:
        call_counts: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                call_counts[node.target] = call_counts.get(node.target, 0) + 1
        for node in self.gm.graph.nodes:
            kind, detail = classify(node, self.modules)
            info = NodeInfo(node, kind, detail=detail)
            if node.op == "call_module":
                info.module_name = node.target
                info.detail["module"] = self.modules[node.target]
                if call_counts[node.target] > 1 and kind in (PRODUCER, GROUPED, CHANNELWISE, PERCHANNEL):
                    info.kind = UNKNOWN  # one module, several call sites: no single cut fits all
                    info.detail["why"] = f"the module is called {call_counts[node.target]} times"
            if self.has_shapes:
                self._map_channels(info)
            self.infos.append(info)
            self.info[node] = info

    def _mapped(self, arg) -> Optional[NodeInfo]:
        if isinstance(arg, torch.fx.Node) and arg in self.info and self.info[arg].channels is not None:
            return self.info[arg]
        return None

    def _fixed_channels(self, info: NodeInfo) -> Optional[list]:
        shape = _shape(info.node)
        if shape is None or len(shape) < 2:
            return None
        return [self._new_atom(Atom("fixed", info.node.name, c)) for c in range(shape[1])]

    def _make_unknown(self, info: NodeInfo, why: str = "") -> None:
        info.kind = UNKNOWN
        if why:
            info.detail["why"] = why
        info.inputs = []
        map_arg((info.node.args, info.node.kwargs), lambda n: info.inputs.append(n) if self._mapped(n) else None)
        info.channels = self._fixed_channels(info)

    def _map_channels(self, info: NodeInfo) -> None:
        """Set info.channels (and ties) from the node's inputs; downgrade to UNKNOWN what does not fit."""
        node, kind = info.node, info.kind
        shape = _shape(node)
        first = self._mapped(node.args[0]) if node.args else None
        if kind == INPUT:
            info.channels = self._fixed_channels(info)
        elif kind == OUTPUT:
            map_arg(node.args, lambda n: info.inputs.append(n) if self._mapped(n) else None)
        elif kind == IGNORE:
            if shape is not None:
                self._make_unknown(info)
        elif kind == PRODUCER:
            self._map_producer(info, first, shape)
        elif kind == GROUPED:
            self._map_grouped(info, first, shape)
        elif kind in (CHANNELWISE, ELEMENTWISE, IDENTITY, POOL, PERCHANNEL):
            self._map_unary(info, first, shape)
        elif kind == MIXING:
            self._map_mixing(info, first, shape)
        elif kind == SPLIT:
            self._map_split(info, first)
        elif kind == GETITEM:
            self._map_getitem(info, first, shape)
        elif kind == TRANSPOSE:
            self._map_transpose(info, first, shape)
        elif kind == SHUFFLE:
            self._map_shuffle(info, first, shape)
        elif kind == FLATTEN:
            self._map_flatten(info, first, shape)
        elif kind == CAT:
            self._map_cat(info, shape)
        elif kind == BINARY:
            self._map_binary(info, shape)
        else:
            self._make_unknown(info)

    def _map_producer(self, info, first, shape) -> None:
        m = info.detail["module"]
        handler = info.detail.get("handler")
        if handler is not None:
            in_size, out_size = (len(first.channels) if first is not None else None), handler.out_channels(m)
        else:
            in_size = m.in_features if isinstance(m, LINEARS) else m.in_channels
            out_size = m.out_features if isinstance(m, LINEARS) else m.out_channels
        if isinstance(m, LINEARS) and (shape is None or len(shape) != 2):
            return self._make_unknown(info, "a Linear on a tensor of rank other than 2 mixes dims other than channels")
        if first is not None:
            if len(first.channels) != in_size or "grid" in first.detail:
                return self._make_unknown(info, f"reads {len(first.channels)} channels but has {in_size} inputs")
            info.inputs = [first.node]
        info.channels = [self._new_atom(Atom("producer", info.module_name, c)) for c in range(out_size)]
        self.producers[info.module_name] = info.channels

    def _map_grouped(self, info, first, shape) -> None:
        m = info.detail["module"]
        if first is None or len(first.channels) != m.in_channels or "grid" in first.detail:
            return self._make_unknown(info, "its input channels could not be mapped")
        info.inputs = [first.node]
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        info.channels = []
        for j in range(m.out_channels):
            g = j // per_out
            deps = tuple(first.channels[g * per_in:(g + 1) * per_in])
            info.channels.append(self._new_atom(Atom("derived", info.module_name, j, deps)))
        self.grouped[info.module_name] = info

    def _map_unary(self, info, first, shape) -> None:
        node = info.node
        if first is None or shape is None or len(shape) < 2:
            return self._make_unknown(info)
        grid = first.detail.get("grid")
        if grid is not None:
            if info.kind not in (IDENTITY, ELEMENTWISE) or tuple(shape[1:3]) != grid:
                return self._make_unknown(info, "an op on a channel grid (a channel dim split in two) other than "
                                                "a transpose, a reshape back or an elementwise op")
            info.detail["grid"] = grid
        elif shape[1] != len(first.channels):
            return self._make_unknown(info)
        if info.kind == CHANNELWISE and info.detail["module"].num_features != len(first.channels):
            return self._make_unknown(info, "BatchNorm size does not match its input's channels")
        rank = len(_shape(first.node))
        if "reduce_dims" in info.detail:  # mean / amax / amin: must keep the batch and channel dims
            dims = info.detail["reduce_dims"]
            reduced = range(rank) if dims is None else [d % rank for d in as_tuple(dims)]
            if 0 in reduced or 1 in reduced:
                return self._make_unknown(info, "reduces over the batch or channel dim")
        if "pad" in info.detail and len(info.detail["pad"]) // 2 > rank - 2:
            return self._make_unknown(info, "pads the channel (or batch) dim")
        extra = [a for a in node.args[1:] if isinstance(a, torch.fx.Node) and _shape(a) is not None]
        if extra:  # e.g. a clamp with tensor bounds: not a per-channel function of one input
            return self._make_unknown(info)
        if info.kind == PERCHANNEL:
            info.detail["in_shape"] = tuple(_shape(first.node))
        info.inputs = [first.node]
        info.channels = list(first.channels)

    def _pass(self, info, first, kind=None, perm=None, grid=None) -> None:
        """Carry ``first``'s channels on (permuted: out position q holds input position perm[q])."""
        if kind is not None:
            info.kind = kind
        info.inputs = [first.node]
        info.channels = list(first.channels) if perm is None else [first.channels[q] for q in perm]
        if perm is not None:
            info.detail["perm"] = perm
        info.detail.pop("grid", None)
        if grid is not None:
            info.detail["grid"] = tuple(grid)

    def _map_mixing(self, info, first, shape) -> None:
        if first is None or shape is None or len(shape) < 2 or "grid" in first.detail or shape[1] != len(first.channels):
            return self._make_unknown(info)
        dims = info.detail["normalized_dims"]
        what = info.detail["what"]
        if dims is not None and dims < len(shape) - 1:  # normalises trailing (spatial) dims only
            info.kind = POOL
            info.detail.update(keeps_constants=False, only_value=None)  # per channel, but a constant is not kept
            return self._pass(info, first)
        self._pass(info, first)
        info.detail["pin"] = (
            f"it reaches {info.label}, a {what} that normalises over the channel dim: removing a channel changes "
            "the mean and variance the other channels are normalised with, so it cannot be exact"
        )

    def _map_split(self, info, first) -> None:
        metas = info.node.meta.get("tensor_meta")
        if first is None or not isinstance(metas, (tuple, list)) or "grid" in first.detail or not all(
            isinstance(t, TensorMetadata) for t in metas
        ):
            return self._make_unknown(info)
        rank = len(_shape(first.node))
        dim = info.detail["dim"]
        if not isinstance(dim, int) or dim % rank == 0:
            return self._make_unknown(info, "splits along the batch dim")
        self._pass(info, first)
        if dim % rank != 1:
            info.detail["parts"] = None  # a spatial split: every part carries every channel
            return
        parts, start = [], 0
        for t in metas:
            parts.append((start, start + t.shape[1]))
            start += t.shape[1]
        info.detail["parts"] = parts
        if len(parts) > 1:
            info.detail["pin"] = (
                f"it reaches {info.label}, a {info.detail['how']} along the channel dim whose part sizes are fixed "
                "in the forward: removing a channel would shift the parts"
            )

    def _map_getitem(self, info, first, shape) -> None:
        if first is None:
            return self._make_unknown(info) if shape is not None else None
        if first.kind == SPLIT:
            index = info.detail["index"]
            parts = first.detail["parts"]
            if not isinstance(index, int):
                return self._make_unknown(info)
            if parts is None:
                return self._pass(info, first, kind=POOL) or info.detail.update(keeps_constants=True)
            start, stop = parts[index]
            info.detail["offset"] = start
            return self._pass(info, first, kind=GETITEM, perm=list(range(start, stop)))
        in_shape = _shape(first.node)
        if shape is None or in_shape is None:
            return self._make_unknown(info)
        index = info.detail["index"]
        index = index if isinstance(index, tuple) else (index,)
        if any(i is None or isinstance(i, torch.fx.Node) or not isinstance(i, (slice, int, type(Ellipsis)))
               for i in index) or sum(i is Ellipsis for i in index) > 1:
            return self._make_unknown(info, "an index other than slices and ints")
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(in_shape) - len(index) + 1) + index[at + 1:]
        index = index + (slice(None),) * (len(in_shape) - len(index))
        if isinstance(index[0], int) or (len(index) > 1 and isinstance(index[1], int)) or "grid" in first.detail:
            return self._make_unknown(info, "an integer index on the batch or channel dim")
        if any(isinstance(i, slice) and any(isinstance(v, torch.fx.Node) for v in (i.start, i.stop, i.step))
               for i in index):
            return self._make_unknown(info, "a slice with computed bounds")
        channels = len(first.channels)
        picked = list(range(channels))[index[1]]
        if picked == list(range(channels)):  # covers every channel: still so after removals (bounds clamp)
            self._pass(info, first, kind=POOL)
            info.detail["keeps_constants"] = True
            return
        step = index[1].step or 1
        self._pass(info, first, kind=GETITEM, perm=picked)
        stop = max(picked) + 1 if picked else 0
        info.detail["pin_below"] = channels if step != 1 or index[1].stop is None else stop
        info.detail["pin"] = (
            f"it reaches {info.label}, a slice of the channel dim with fixed bounds: removing a channel before "
            "the slice's end would shift it"
        )

    def _map_transpose(self, info, first, shape) -> None:
        if first is None or shape is None:
            return self._make_unknown(info)
        rank = len(shape)
        if "permute" in info.detail:
            order = [d % rank for d in info.detail["permute"]]
        else:
            d0, d1 = info.detail["dims"]
            if not isinstance(d0, int) or not isinstance(d1, int):
                return self._make_unknown(info)
            order = list(range(rank))
            order[d0 % rank], order[d1 % rank] = order[d1 % rank], order[d0 % rank]
        grid = first.detail.get("grid")
        cdims = 2 if grid is not None else 1
        if order[0] != 0 or sorted(order[1:1 + cdims]) != list(range(1, 1 + cdims)):
            return self._make_unknown(info, "moves the channel dim (e.g. to a channels-last layout)")
        if grid is None or order[1:3] == [1, 2]:
            return self._pass(info, first, grid=grid)
        a, b = grid  # out[j, r] = in[r, j]
        self._pass(info, first, perm=[r * b + j for j in range(b) for r in range(a)], grid=(b, a))

    def _map_shuffle(self, info, first, shape) -> None:
        groups = info.detail.get("groups")
        if first is None or shape is None or not isinstance(groups, int) or "grid" in first.detail:
            return self._make_unknown(info)
        channels = len(first.channels)
        per = channels // groups
        for i in range(per):  # the shuffle keeps its groups: channel i of every group goes together
            for g in range(1, groups):
                self._tie(first.channels[i], first.channels[g * per + i])
        self._pass(info, first, perm=[g * per + i for i in range(per) for g in range(groups)])

    def _map_flatten(self, info, first, shape) -> None:
        if first is None or shape is None:
            return self._make_unknown(info)
        in_shape = _shape(first.node)
        rank = len(in_shape)
        if "grid" in first.detail or "reshape" in info.detail and len(shape) == rank + 1:
            return self._map_grid_reshape(info, first, shape, in_shape)
        spatial = math.prod(in_shape[2:])
        if "reshape" in info.detail:
            target = info.detail["reshape"]
            if tuple(shape) == tuple(in_shape) and target is not None and len(target) == rank:
                return self._map_same_reshape(info, first, target)
            keeps_batch = tuple(shape) == (in_shape[0], in_shape[1] * spatial)
            if not (keeps_batch and target is not None and len(target) == 2 and target[1] == -1):
                return self._make_unknown(
                    info, "a view/reshape that is not a flatten to (N, -1): it may regroup channels, or "
                    "hard-code a size that changes when channels are removed",
                )
        else:
            start, end = info.detail["start_dim"] % rank, info.detail["end_dim"] % rank
            if start >= 2 or start == end:
                return self._pass(info, first, kind=IDENTITY)  # channels untouched
            if start != 1 or end != rank - 1:
                return self._make_unknown(info, "flattens the batch dim or only part of the trailing dims")
        info.inputs = [first.node]
        info.detail["repeat"] = spatial
        info.channels = [a for a in first.channels for _ in range(spatial)]

    @staticmethod
    def _dynamic(size) -> bool:
        """A view size the pruned model recomputes (from x.size()), not a hard-coded number."""
        return isinstance(size, torch.fx.Node) or size == -1

    def _map_same_reshape(self, info, first, target) -> None:
        self._pass(info, first, kind=SHUFFLE)
        if not self._dynamic(target[1]):
            info.detail["pin"] = (f"it reaches {info.label}, a view/reshape that hard-codes the channel count "
                                  f"({target[1]})")

    def _map_grid_reshape(self, info, first, shape, in_shape) -> None:
        """Split the channel dim into a grid, merge a grid back, or keep it (see the module docstring)."""
        grid = first.detail.get("grid")
        target = info.detail.get("reshape")
        unknown = "a view/reshape of the channel dim other than a split into two dims and back"
        if grid is None:  # (N, C, *S) -> (N, a, b, *S)
            if target is None or len(target) != len(shape) or shape[0] != in_shape[0] or \
                    tuple(shape[3:]) != tuple(in_shape[2:]) or shape[1] * shape[2] != in_shape[1]:
                return self._make_unknown(info, unknown)
            a, b = shape[1], shape[2]
            self._pass(info, first, kind=SHUFFLE, grid=(a, b))
            static_rows, static_cols = not self._dynamic(target[1]), not self._dynamic(target[2])
            if static_rows and not static_cols:  # a rows stay: remove whole columns
                for j in range(b):
                    for r in range(1, a):
                        self._tie(first.channels[j], first.channels[r * b + j])
            elif static_cols and not static_rows:  # b columns stay: remove whole rows
                for r in range(a):
                    for j in range(1, b):
                        self._tie(first.channels[r * b], first.channels[r * b + j])
            else:
                info.detail["pin"] = (f"it reaches {info.label}, a view that splits the channel dim with "
                                      f"{'hard-coded' if static_rows else 'only computed'} sizes")
            return
        a, b = grid
        if tuple(shape) == tuple(in_shape):
            return self._pass(info, first, kind=SHUFFLE, grid=grid)
        if tuple(shape) == (in_shape[0], a * b) + tuple(in_shape[3:]) and (
            "reshape" not in info.detail or (len(target) == len(shape) and self._dynamic(target[1]))
        ):
            if "reshape" not in info.detail and (info.detail["start_dim"] % len(in_shape), info.detail["end_dim"] %
                                                  len(in_shape)) != (1, 2):
                return self._make_unknown(info, unknown)
            return self._pass(info, first, kind=SHUFFLE)
        return self._make_unknown(info, unknown)

    def _map_cat(self, info, shape) -> None:
        parts = info.node.args[0] if info.node.args else info.node.kwargs.get("tensors")
        mapped = [self._mapped(p) for p in parts] if isinstance(parts, (list, tuple)) else [None]
        dim = info.detail["dim"]
        if shape is None or any(m is None or "grid" in m.detail for m in mapped) or dim % len(shape) != 1:
            return self._make_unknown(info, "concatenates along a dim other than channels")
        info.inputs = [m.node for m in mapped]
        info.channels = [a for m in mapped for a in m.channels]

    def _map_binary(self, info, shape) -> None:
        node = info.node
        left, right = node.args[0], node.args[1] if len(node.args) > 1 else None
        a, b = self._mapped(left), self._mapped(right)
        if shape is None or len(shape) < 2 or any(m is not None and "grid" in m.detail for m in (a, b)):
            return self._make_unknown(info)
        if a is not None and b is not None:
            if len(a.channels) != len(b.channels) or len(_shape(a.node)) != len(_shape(b.node)):
                return self._make_unknown(info, "broadcasts over the channel dim")
            for x, y in zip(a.channels, b.channels):
                self._tie(x, y)
                if info.detail["op"] is operator.mul:
                    self.gated.update((x, y))
            info.inputs = [a.node, b.node]
            info.channels = list(a.channels)
            return
        mapped, other = (a, right) if a is not None else (b, left)
        if isinstance(other, torch.fx.Node) and other.op == "get_attr":
            # A one-element parameter or buffer (timm's LearnableAffineBlock: scale * x + bias) is a
            # number too; it is read when the op is applied, so it is the model's current value.
            value = operator.attrgetter(other.target)(self.gm)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                other = value
        if isinstance(other, torch.Tensor):
            scalar = other.detach()
            other_fn = lambda t, s=scalar: s.to(device=t.device, dtype=t.dtype).reshape(())
        elif isinstance(other, (int, float)) and not isinstance(other, bool):
            other_fn = lambda t, v=other: v
        else:
            return self._make_unknown(info)
        if mapped is None:
            return self._make_unknown(info)
        # Arithmetic with a number is an elementwise function of one channel tensor.
        op = info.detail["op"]
        info.kind = ELEMENTWISE
        info.detail["fn"] = (lambda t: op(t, other_fn(t))) if a is not None else (lambda t: op(other_fn(t), t))
        info.inputs = [mapped.node]
        info.channels = list(mapped.channels)

    # --- private chains --------------------------------------------------------------------
    def _private_chains(self) -> dict[str, list]:
        """layer -> the nodes only it feeds (see the module docstring), the layer's node first."""
        chains = {}
        for info in self.infos:
            if info.kind != PRODUCER:
                continue
            chain = [info.node]
            current = info.node
            while len(current.users) == 1:
                user = next(iter(current.users))
                user_info = self.info[user]
                if user_info.kind not in CHAIN_KINDS or user.args[:1] != (current,):
                    break
                if self.has_shapes and user_info.inputs != [current]:
                    break
                chain.append(user)
                current = user
            chains[info.module_name] = chain
        return chains

    def producer_of(self, module_name: str) -> Optional[str]:
        """The prunable layer whose unit contains module ``module_name`` (the layer itself, or a
        BN / activation in its private chain); None if it belongs to none."""
        for layer, chain in self.chains.items():
            if any(n.op == "call_module" and n.target == module_name for n in chain):
                return layer
        return None

    def readers(self, layer: str) -> list[list[tuple[NodeInfo, list[int]]]]:
        """Per output channel of ``layer``, what consumes it: ``(node, positions)`` for every
        Conv/Linear reading it (``positions``: where it sits in that layer's input, several after
        a flatten), and for any grouped conv, op the analysis does not understand, or model
        output it reaches (positions there in the input that carries it). Ops that only carry
        channels on (BN, activations, pooling, cat, flatten) are looked through; a channel tied
        to others (residual add) is read wherever their sum is. Needs the example inputs' shapes.
        """
        if not self.has_shapes:
            raise ValueError("ChannelGraph.readers needs channel maps: build the graph with example_inputs")
        channels_of: dict[int, list[int]] = {}  # tie class -> this layer's channels in it
        for c, atom in enumerate(self.producers[layer]):
            channels_of.setdefault(self.find(atom), []).append(c)
        found: list[list] = [[] for _ in self.producers[layer]]
        for info in self.infos:
            if info.kind not in (PRODUCER, GROUPED, UNKNOWN, OUTPUT):
                continue
            for node in info.inputs:
                positions: dict[int, list[int]] = {}
                for p, atom in enumerate(self.info[node].channels):
                    for c in channels_of.get(self.find(atom), ()):
                        positions.setdefault(c, []).append(p)
                for c, where in positions.items():
                    found[c].append((info, where))
        return found

    def chain_bn(self, layer: str) -> Optional[NodeInfo]:
        """The first BatchNorm in ``layer``'s private chain, if any."""
        for n in self.chains[layer][1:]:
            if self.info[n].kind == CHANNELWISE:
                return self.info[n]
        return None

    def chain_constant_from_bn(self, layer: str, channel: int) -> Optional[float]:
        """The value at the end of ``layer``'s private chain of a channel whose BN has gamma
        treated as 0 (BN output beta), or None when the chain does not keep it constant."""
        bn = self.chain_bn(layer)
        if bn is None:
            return None
        module = bn.detail["module"]
        value = after_norm_act(bn, 0.0 if module.bias is None else scalar_at(module.bias, channel))
        chain = self.chains[layer]
        for n in chain[chain.index(bn.node) + 1:]:
            value = constant_through(self.info[n], channel, value)
            if value is None:
                return None
        return value


def analyze_dependencies(model: nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None) -> ChannelGraph:
    """Trace ``model`` (not modified) and map its channel dependencies on ``example_inputs``
    (a tensor or a tuple of tensors). ``leaf_modules``: module classes or names kept as opaque
    nodes (their output channels fixed, unless registered: ``register_channel_op``);
    ``concrete_args``: fixed Python arguments of ``forward``. Raises UntraceableModelError (an
    UnsupportedModelError) naming the module fx could not trace."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return ChannelGraph(model, tuple(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args)
