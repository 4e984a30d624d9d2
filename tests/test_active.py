"""The shared attack bookkeeping: early stopping on broken points (Active) and the EOT loop."""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import eot_gradient


def test_active_records_broken_rows_drops_them_and_charges_exact_costs():
    x = torch.arange(5.0).view(5, 1, 1, 1)
    found = Active(x)
    assert len(found) == 5 and found.restart()
    cur = x + 10
    state = {"m": torch.arange(5), "none": None}
    found.spend(gradients=1, forwards=1)
    assert not found.retire(torch.zeros(5, dtype=torch.bool), cur)  # nothing broken: nothing changes
    found.spend(gradients=1, forwards=1)
    assert found.retire(torch.tensor([False, True, False, True, False]), cur, value=torch.arange(5.0))
    cur, state = found.kept(cur, state)
    assert found.pos.tolist() == [0, 2, 4] and cur.flatten().tolist() == [10, 12, 14]
    assert state["m"].tolist() == [0, 2, 4] and state["none"] is None
    found.spend(forwards=1)
    found.close(cur + 100, success=torch.tensor([True, False, False]))
    assert found.x_adv.flatten().tolist() == [110, 11, 112, 13, 114]
    assert found.success.tolist() == [True, True, False, True, False]
    assert found.gradients.tolist() == [2, 2, 2, 2, 2] and found.forwards.tolist() == [3, 2, 3, 2, 3]
    assert found.value[[1, 3]].tolist() == [1.0, 3.0]
    # A second run only on the samples not broken yet; its costs add up.
    assert found.restart() and found.pos.tolist() == [2, 4]
    found.spend(forwards=4)
    found.close(torch.zeros(2, 1, 1, 1))
    assert found.forwards.tolist() == [3, 2, 7, 2, 7]
    result = found.result()
    assert result.x_adv is found.x_adv and result.forwards is found.forwards


def test_merge_keeps_successes_and_the_best_scored_points():
    found = Active(torch.zeros(4, 1))
    first = Active(torch.ones(4, 1))
    first.value = torch.tensor([1.0, 5.0, 2.0, 0.0])
    first.success[3] = True
    first.forwards += 3
    found.merge(torch.arange(4), first)
    idx = found.unbroken()
    assert idx.tolist() == [0, 1, 2]
    second = Active(torch.full((3, 1), 2.0))
    second.value = torch.tensor([3.0, 4.0, 2.0])  # better, worse, tied
    second.forwards += 1
    found.merge(idx, second)
    assert found.x_adv.flatten().tolist() == [2.0, 1.0, 1.0, 1.0]
    assert found.value.tolist() == [3.0, 5.0, 2.0, 0.0]
    assert found.success.tolist() == [False, False, False, True]
    assert found.forwards.tolist() == [4, 4, 4, 3]


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x + 0.1 * torch.randn_like(x))


def test_eot_gradient_averages_draws_in_order_and_differentiates_the_input_only():
    torch.manual_seed(0)
    model, x = _Noisy(), torch.rand(4, 3)
    objective = lambda out: out[:, 0] - out[:, 1]  # noqa: E731
    torch.manual_seed(1)
    out, value, grad = eot_gradient(model, objective, x, draws=3)
    torch.manual_seed(1)
    outs, grads = [], []
    for _ in range(3):
        xr = x.clone().requires_grad_(True)
        o = model(xr)
        (g,) = torch.autograd.grad(objective(o).sum(), xr)
        outs.append(o.detach())
        grads.append(g)
    assert torch.equal(out, (outs[0] + outs[1] + outs[2]) / 3)
    assert torch.equal(grad, (grads[0] + grads[1] + grads[2]) / 3)
    assert torch.allclose(value, objective(out))  # a linear objective: the mean of the values
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(1)
    _, _, summed = eot_gradient(model, objective, x, draws=3, average=False)
    assert torch.equal(summed, grads[0] + grads[1] + grads[2])
    out, value, none = eot_gradient(model, objective, x, draws=2, grad=False)
    assert none is None and out.shape == (4, 2) and not out.requires_grad
