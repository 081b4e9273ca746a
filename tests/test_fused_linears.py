"""trainer.fused_linears: linears that read one input run as one GEMM, with the same values and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainer.fused_linears import PASS, fuse_linears


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
    """q, k and v as PEFT's LoRA layers compute them: frozen base + scale * B(A(x)). With `peek`, the
    output also reads k's piece of the A product directly, so that piece has two readers."""

    def __init__(self, peek: bool = False) -> None:
        super().__init__()
        linear = torch.nn.Linear
        self.base = torch.nn.ModuleList(linear(8, n, bias=False).requires_grad_(False) for n in (8, 6, 4))
        self.down = torch.nn.ModuleList(linear(8, 2, bias=False) for _ in range(3))
        self.up = torch.nn.ModuleList(linear(2, n, bias=False) for n in (8, 6, 4))
        self.peek = peek

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = [down(x) for down in self.down]
        parts = [base(x) + 0.5 * up(h) for base, up, h in zip(self.base, self.up, hidden, strict=True)]
        return torch.cat(parts + ([hidden[1]] if self.peek else []), dim=-1).sin()


def test_the_b_matrices_reading_the_pieces_of_one_product_run_as_one_block_diagonal_gemm() -> None:
    torch.manual_seed(0)
    for peek, groups in ((False, 3), (True, 2)):  # frozen bases, A matrices, and the B matrices unless one piece is shared
        module = LoraProjections(peek)
        x = torch.randn(2, 5, 8, requires_grad=True)
        weights = torch.randn(2, 5, 18 + 2 * peek)
        trained = [x, *(layer.weight for layer in (*module.down, *module.up))]
        (module(x) * weights).sum().backward()
        grads = [t.grad.clone() for t in trained]
        for t in trained:
            t.grad = None

        backend = Fusing()
        got = torch.compile(module, backend=backend, fullgraph=True)(x)
        (got * weights).sum().backward()

        assert backend.fused == [groups]
        torch.testing.assert_close(got, module(x))
        for t, grad in zip(trained, grads, strict=True):
            torch.testing.assert_close(t.grad, grad)


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


def test_the_pass_has_a_stable_cache_key() -> None:
    # Inductor caches a compile that used a custom pass only when the pass names itself.
    assert PASS.uuid() == type(PASS)().uuid() and PASS.uuid()
