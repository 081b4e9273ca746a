"""trainer.fused_linears: linears that read one input run as one GEMM, with the same values and gradients."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from trainer.fused_linears import PASS, FuseLinearsPass, fuse_linears, pointwise_convolutions


class Projections(torch.nn.Module):
    """An attention block's pattern: frozen q/k/v projections of one input, trained LoRA-like A
    matrices of the same input, two biased projections of it, and one of another input."""

    def __init__(self) -> None:
        super().__init__()
        linear = torch.nn.Linear
        self.q, self.k, self.v = (linear(8, n, bias=False).requires_grad_(False) for n in (8, 6, 4))
        self.a1, self.a2 = linear(8, 2, bias=False), linear(8, 3, bias=False)
        self.p1, self.p2 = (linear(8, 5).requires_grad_(False) for _ in range(2))
        self.other = linear(8, 4, bias=False).requires_grad_(False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        parts = [self.q(x), self.k(x), self.v(x), self.a1(x), self.a2(x), self.p1(x), self.p2(x), self.other(context)]
        return torch.cat([part.sin() for part in parts], dim=-1)


class Fusing:
    """A torch.compile backend that runs the pass, records what it fused, and runs the graph as it is."""

    def __init__(self) -> None:
        self.fused: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.fused.append(fuse_linears(gm.graph))
        gm.recompile()
        return gm.forward


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.slow  # torch.compile
def test_linears_sharing_an_input_fuse_by_kind_with_the_same_values_and_gradients() -> None:
    torch.manual_seed(0)
    module = Projections()
    x = torch.randn(2, 5, 8, requires_grad=True)
    context = torch.randn(2, 5, 8)
    weights = torch.randn(2, 5, 8 + 6 + 4 + 2 + 3 + 5 + 5 + 4)

    expected = module(x, context)
    (expected * weights).sum().backward()
    grads = [t.grad.clone() for t in (x, module.a1.weight, module.a2.weight)]
    for t in (x, module.a1.weight, module.a2.weight):
        t.grad = None

    backend = Fusing()
    got = torch.compile(module, backend=backend, fullgraph=True)(x, context)
    (got * weights).sum().backward()

    # Frozen q/k/v, trained A matrices, biased projections: three groups. `other` reads another input.
    assert backend.fused == [3]
    torch.testing.assert_close(got, expected)
    for t, grad in zip((x, module.a1.weight, module.a2.weight), grads, strict=True):
        torch.testing.assert_close(t.grad, grad)
    assert all(p.grad is None for p in (module.q.weight, module.p1.weight, module.other.weight))


class LoraProjections(torch.nn.Module):
    """q, k and v as PEFT's LoRA layers compute them: frozen base + scale * B(A(x)), with outputs of
    `sizes`. With `peek`, the output also reads k's piece of the A product directly."""

    def __init__(self, sizes: tuple[int, ...] = (8, 8, 8), peek: bool = False) -> None:
        super().__init__()
        linear = torch.nn.Linear
        self.base = torch.nn.ModuleList(linear(8, n, bias=False).requires_grad_(False) for n in sizes)
        self.down = torch.nn.ModuleList(linear(8, 2, bias=False) for _ in sizes)
        self.up = torch.nn.ModuleList(linear(2, n, bias=False) for n in sizes)
        self.peek = peek

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = [down(x) for down in self.down]
        parts = [base(x) + 0.5 * up(h) for base, up, h in zip(self.base, self.up, hidden, strict=True)]
        return torch.cat(parts + ([hidden[1]] if self.peek else []), dim=-1).sin()


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize(("sizes", "peek", "groups"), [
    ((8, 8, 8), False, 3),  # the frozen bases, the A matrices, the B matrices
    ((8, 8, 8), True, 2),  # one piece of the A product has a second reader: the B matrices stay apart
    ((8, 6, 4), False, 2),  # B matrices of different shapes stay apart
])
def test_the_b_matrices_reading_the_pieces_of_one_product_run_as_one_batched_gemm(
        sizes: tuple[int, ...], peek: bool, groups: int) -> None:
    torch.manual_seed(0)
    module = LoraProjections(sizes, peek)
    x = torch.randn(2, 5, 8, requires_grad=True)
    weights = torch.randn(2, 5, sum(sizes) + 2 * peek)
    trained = [x, *(layer.weight for layer in (*module.down, *module.up))]
    expected = torch.autograd.grad((module(x) * weights).sum(), trained)

    backend = Fusing()
    got = torch.compile(module, backend=backend, fullgraph=True)(x)
    grads = torch.autograd.grad((got * weights).sum(), trained)

    assert backend.fused == [groups]
    torch.testing.assert_close(got, module(x))
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want)
    # Laid out as the weights are, the gradients reach .grad without a copy each.
    assert all(grad.is_contiguous() for grad in grads)


@pytest.mark.slow  # torch.compile
def test_a_linear_whose_output_is_written_in_place_stays_apart() -> None:
    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y.mul_(2)
            return y + self.b(x)

    module, x = InPlace(), torch.randn(3, 4)
    backend = Fusing()
    torch.testing.assert_close(torch.compile(module, backend=backend)(x), module(x))
    assert backend.fused == [0]


class Convolutions(torch.nn.Module):
    """A transformer's 1x1 projection (replaced), then convolutions that are not pointwise linears:
    3x3, strided 1x1, grouped 1x1."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.project = conv(8, 6, 1)
        self.others = torch.nn.ModuleList([conv(6, 6, 3, padding=1), conv(6, 6, 1, stride=2), conv(6, 6, 1, groups=2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return sum(other(x).sum() for other in self.others) + x.square().sum()


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("channels_last", [False, True])
def test_1x1_convolutions_become_linears_over_channels_with_the_same_values_and_gradients(channels_last: bool) -> None:
    torch.manual_seed(0)
    module = Convolutions()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    if channels_last:
        module.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    trained = [x, *module.parameters()]
    expected = module(x)
    want = torch.autograd.grad(expected, trained)
    replaced: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        replaced.append(pointwise_convolutions(gm.graph))
        gm.recompile()
        return gm.forward

    got = torch.compile(module, backend=backend, fullgraph=True)(x)
    assert replaced == [1]
    torch.testing.assert_close(got, expected)
    for grad, expected_grad in zip(torch.autograd.grad(got, trained), want, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_the_pass_has_a_stable_cache_key_that_names_its_settings() -> None:
    # Inductor caches a compile that used a custom pass only when the pass names itself.
    assert PASS.uuid() == FuseLinearsPass().uuid() and PASS.uuid()
    assert FuseLinearsPass(convolutions=False).uuid() != PASS.uuid()


@pytest.mark.slow  # torch.compile
def test_the_pass_keys_inductors_cache_by_its_settings_not_by_what_it_did_so_far() -> None:
    """Torch 2.11's inductor pickles its settings, the pass object among them, into each graph's
    cache key (later versions hash the pass's uuid() instead). A pickle that moved with the pass's
    counts made a worker miss the training step a start helper had compiled: on an H200 each of the
    step's 27 keys differed in this alone (bench/RESULTS.md)."""
    graph_pass = FuseLinearsPass()
    before = pickle.dumps(graph_pass)

    def run_pass(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graph_pass(gm.graph)
        gm.recompile()
        return gm.forward

    torch.compile(Projections(), backend=run_pass, fullgraph=True)(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert graph_pass.groups > 0  # it fused something, and counted it
    assert pickle.dumps(graph_pass) == before == pickle.dumps(FuseLinearsPass())
    assert pickle.dumps(FuseLinearsPass(convolutions=False)) != before  # its settings do key the cache
    copy = pickle.loads(before)
    assert (copy.convolutions, copy.groups) == (True, 0)
