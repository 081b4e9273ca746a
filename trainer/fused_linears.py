"""A graph pass for the compiled training step: linear layers that read the same input become one GEMM.

At 512 px and batch 1 most of the training step's GEMMs are small, and under CUDA graphs each costs
a few microseconds however little it computes (bench/RESULTS.md: the compiled step's kernel table
holds hundreds of 3-5 us cuBLAS kernels). In an attention block the query, key and value
projections read the same hidden states (the key and value of every cross-attention in a stage read
the text embeddings), and so do the A matrices of their LoRA layers. Concatenating the weights of each such
group and splitting the product is the same arithmetic in one launch, and autograd then computes
the input's gradient of the whole group in one GEMM too, and the A matrices' gradients in another.

The LoRA B matrices then read the pieces of one product: the B of q reads the part of the fused A
product that is q's, and so on. Such a set of linears, each reading its own piece of a split, is one
linear of the whole product by their block-diagonal weight, whose output is the concatenation of
theirs: three GEMMs become one, in the backward too (one for the weights' gradient, one for the
input's). The zero blocks add exact zeros; at LoRA ranks they cost a few MFLOP, far less than a launch.

Frozen weights and trained ones are grouped apart: a fused GEMM whose weight needs a gradient
computes it for every row, and the base weights' gradients are not wanted. The pass runs on the
graph dynamo hands to the compiler, before autograd (inductor's `pre_grad_custom_pass`).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

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
    of such a split by one block-diagonal linear; returns how many groups were fused (of both kinds)."""
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
    fused += sum(_block_diagonal(graph, parts, order) for parts in splits)
    if fused:
        log.debug("fused %d groups of linear layers sharing an input", fused)
    return fused


def _block_diagonal(graph: torch.fx.Graph, parts: torch.fx.Node, order: dict[torch.fx.Node, int]) -> bool:
    """If every piece of the split `parts` feeds one bias-free linear, and those linears' weights are
    of one kind, replace them by one linear of the split's input with their block-diagonal weight."""
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
    if any(_value(w).shape[1] != size for w, size in zip(weights, sizes, strict=True)):
        return False
    first = min(readers, key=order.__getitem__)
    if any(w in order and order[w] > order[first] for w in weights):
        return False
    with graph.inserting_before(first):
        weight = graph.call_function(torch.block_diag, tuple(weights))
        product = graph.call_function(torch.nn.functional.linear, (product, weight, None))
        outputs = graph.call_function(torch.split, (product, [_value(w).shape[0] for w in weights]), {"dim": -1})
        for i, reader in enumerate(readers):
            output = graph.call_function(operator.getitem, (outputs, i))
            output.meta.update(reader.meta)
            reader.replace_all_uses_with(output)
    for reader, piece in zip(readers, pieces, strict=True):
        graph.erase_node(reader)
        graph.erase_node(piece)
    graph.erase_node(parts)
    return True


class FuseLinearsPass(CustomGraphPass):
    """`fuse_linears` as inductor's pre-grad pass; its uuid (this file's hash) keys inductor's cache.
    `groups` counts the groups fused so far in the process, for benchmarks and logs."""

    def __init__(self) -> None:
        self.groups = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.groups += fuse_linears(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


PASS = FuseLinearsPass()
