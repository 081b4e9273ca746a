"""A graph pass for the compiled training step: linear layers that read the same input become one
GEMM, and 1x1 convolutions become linears.

At 512 px and batch 1 most of the training step's GEMMs are small, and under CUDA graphs each costs
a few microseconds however little it computes (bench/RESULTS.md: the compiled step's kernel table
holds hundreds of 3-5 us cuBLAS kernels). In an attention block the query, key and value
projections read the same hidden states (the key and value of every cross-attention in a stage read
the text embeddings), and so do the A matrices of their LoRA layers. Concatenating the weights of each such
group and splitting the product is the same arithmetic in one launch, and autograd then computes
the input's gradient of the whole group in one GEMM too, and the A matrices' gradients in another.

The LoRA B matrices then read the pieces of one product: the B of q reads the part of the fused A
product that is q's, and so on. Such a set of linears of one shape is one batched GEMM of the product,
seen as a batch of pieces, with the stacked weights: three GEMMs become one, in the backward too
(one for the weights' gradients, one for the input's). The batch computes the transposed outputs,
so that the weights' gradients come out as slices of one stacked gradient laid out as the weights
are, and autograd hands them on without a copy: a gradient in any other layout (a block-diagonal
weight's slices, or the transpose the plain batched product gives) costs a copy per weight, launched
one by one outside the CUDA graph.

Frozen weights and trained ones are grouped apart: a fused GEMM whose weight needs a gradient
computes it for every row, and the base weights' gradients are not wanted. The pass runs on the
graph dynamo hands to the compiler, before autograd (inductor's `pre_grad_custom_pass`).

What each of these saves in a training step: bench/RESULTS.md, "Fused linears".
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.nn.modules.utils import _pair

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch.nn.functional.linear, torch._C._nn.linear)


def _value(node: Any) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _group_key(node: torch.fx.Node) -> tuple[Any, ...] | None:
    """What linears must share to be fused: the input node, whether the weight trains, its dtype and
    device, and whether there is a bias. None for anything that is not a fusable linear."""
    if node.op != "call_function" or node.target not in LINEAR_TARGETS or node.kwargs:
        return None
    x, weight, bias = (*node.args, None)[:3]
    weight_value = _value(weight)
    if _value(x) is None or weight_value is None or weight_value.dim() != 2:
        return None
    if bias is not None and _value(bias) is None:
        return None
    # A user that writes into the result in place would write into the shared product instead.
    if any(str(user.target).endswith("_") for user in node.users):
        return None
    return (x, weight_value.requires_grad, weight_value.dtype, weight_value.device, bias is None)


def fuse_linears(graph: torch.fx.Graph) -> int:
    """Replace each group of two or more linears sharing an input by one linear over the
    concatenated weights and a split of its output, then each set of linears reading all the pieces
    of such a split by one batched GEMM; returns how many groups were fused (of both kinds)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple[Any, ...], list[torch.fx.Node]] = {}
    for node in graph.nodes:
        key = _group_key(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    fused = 0
    splits: list[torch.fx.Node] = []
    for (x, *_, no_bias), members in groups.items():
        first = members[0]
        # Every weight and bias must exist where the fused product goes (before the first member).
        members = [m for m in members if all(order[a] < order[first] for a in m.args[1:] if a is not None)]
        if len(members) < 2:
            continue
        weights = [m.args[1] for m in members]
        sizes = [_value(w).shape[0] for w in weights]
        with graph.inserting_before(first):
            weight = graph.call_function(torch.cat, (weights,), {"dim": 0})
            bias = None if no_bias else graph.call_function(torch.cat, ([m.args[2] for m in members],), {"dim": 0})
            product = graph.call_function(torch.nn.functional.linear, (x, weight, bias))
            parts = graph.call_function(torch.split, (product, sizes), {"dim": -1})
            splits.append(parts)
            for i, member in enumerate(members):
                part = graph.call_function(operator.getitem, (parts, i))
                part.meta.update(member.meta)
                member.replace_all_uses_with(part)
        for member in members:
            graph.erase_node(member)
        fused += 1
    fused += sum(_batched(graph, parts, order) for parts in splits)
    if fused:
        log.debug("fused %d groups of linear layers sharing an input", fused)
    return fused


def _batched(graph: torch.fx.Graph, parts: torch.fx.Node, order: dict[torch.fx.Node, int]) -> bool:
    """If every piece of the split `parts` feeds one bias-free linear, and those linears' weights are
    of one kind and shape, replace them by one batched GEMM of the split's input with the stacked weights."""
    product, sizes = parts.args
    pieces = sorted(parts.users, key=lambda piece: piece.args[1])
    if [piece.args[1] for piece in pieces] != list(range(len(sizes))) or len(pieces) < 2:
        return False
    readers = [next(iter(piece.users)) if len(piece.users) == 1 else None for piece in pieces]
    keys = [_group_key(r) if r is not None and r.args[0] is piece else None for r, piece in zip(readers, pieces, strict=True)]
    kinds = {key[1:] if key is not None else None for key in keys}  # all but the input, which differs
    if len(kinds) != 1 or None in kinds or not next(iter(kinds))[-1]:  # one kind of weight, no biases
        return False
    weights = [reader.args[1] for reader in readers]
    shapes = {tuple(_value(w).shape) for w in weights}
    piece = _value(pieces[0])
    lead = tuple(piece.shape[:-1]) if piece is not None else (None,)
    if len(shapes) != 1 or next(iter(shapes))[1] != sizes[0] or not all(isinstance(n, int) for n in lead):
        return False  # the compiled training's shapes are static; dynamic sizes are left alone
    first = min(readers, key=order.__getitem__)
    if any(w in order and order[w] > order[first] for w in weights):
        return False
    out_features, rank = next(iter(shapes))
    # Batched out_i^T = W_i @ piece_i^T: autograd then computes the stacked weights' gradient as
    # (n, out, rank), laid out as they are, and each weight's gradient is a dense slice of it.
    with graph.inserting_before(first):
        stacked = graph.call_function(torch.stack, (weights,))
        columns = graph.call_function(torch.reshape, (product, (-1, len(weights), rank)))
        columns = graph.call_function(torch.permute, (columns, (1, 2, 0)))  # (n, rank, rows)
        outputs = graph.call_function(torch.bmm, (stacked, columns))  # (n, out, rows)
        for i, reader in enumerate(readers):
            output = graph.call_function(operator.getitem, (outputs, i))
            output = graph.call_function(torch.reshape, (graph.call_function(torch.t, (output,)), (*lead, out_features)))
            output.meta.update(reader.meta)
            reader.replace_all_uses_with(output)
    for reader, piece in zip(readers, pieces, strict=True):
        graph.erase_node(reader)
        graph.erase_node(piece)
    graph.erase_node(parts)
    return True


def pointwise_convolutions(graph: torch.fx.Graph) -> int:
    """Replace each 1x1 convolution (stride 1, no padding, one group) by the linear over channels that
    it is, on a channels-last view of its input; returns how many were replaced.

    SD1.5's transformers project in and out with 1x1 convolutions (`use_linear_projection=False`),
    as do the ResNet shortcuts that change the channel count. On channels-last weights cuDNN's
    backward wants its incoming gradient channels-last, and the one autograd hands it from inductor's
    kernels is not, so each such convolution's backward copies it first. As a GEMM the layout is
    inductor's to choose, and the channels-last view of a channels-last input costs nothing.
    """
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.conv2d or node.kwargs:
            continue
        x, weight, bias, stride, padding, _dilation, groups = (*node.args, None, 1, 0, 1, 1)[:7]
        weight_value = _value(weight)
        if (_value(x) is None or _value(x).dim() != 4 or weight_value is None or weight_value.shape[2:] != (1, 1)
                or groups != 1 or {*_pair(stride)} != {1} or {*_pair(padding)} != {0}):
            continue
        with graph.inserting_before(node):
            rows = graph.call_function(torch.permute, (x, (0, 2, 3, 1)))
            product = graph.call_function(torch.nn.functional.linear, (rows, graph.call_function(torch.flatten, (weight, 1)), bias))
            output = graph.call_function(torch.permute, (product, (0, 3, 1, 2)))
        output.meta.update(node.meta)
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        replaced += 1
    return replaced


class FuseLinearsPass(CustomGraphPass):
    """`pointwise_convolutions` then `fuse_linears`, as inductor's pre-grad pass; its uuid (this
    file's hash and its settings) keys inductor's cache. `convolutions=False` leaves convolutions
    alone (benchmarks compare). `groups` and `convolutions_replaced` count what it did so far in the
    process, for benchmarks and logs."""

    def __init__(self, *, convolutions: bool = True) -> None:
        self.convolutions = convolutions
        self.groups = 0
        self.convolutions_replaced = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.convolutions:
            self.convolutions_replaced += pointwise_convolutions(graph)
        self.groups += fuse_linears(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,)) + (b"+conv" if self.convolutions else b"")

    def __getstate__(self) -> dict[str, bool]:
        # Inductor pickles its settings, this pass among them, into each graph's cache key. With the
        # counts in it, a graph's key would depend on how many graphs the process compiled before it,
        # and a worker would miss the code a start helper (trainer.start_helpers) or its own previous
        # start compiled in another order. Only the settings key the cache.
        return {"convolutions": self.convolutions}

    def __setstate__(self, state: dict[str, bool]) -> None:
        self.__init__(**state)  # type: ignore[misc]


PASS = FuseLinearsPass()
