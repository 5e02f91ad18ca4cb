import math

import pytest
import torch

from trim.prune.curriculum import Curriculum
from trim.prune.distill import bce_sigmoid, hidden_cosine, kl_logits


@pytest.mark.parametrize("shape", ["linear", "cosine", "cubic"])
def test_curriculum_goes_from_one_to_final_monotonically(shape):
    c = Curriculum(final=0.4, steps=100, warmup=10, shape=shape)
    targets = [c.target(s) for s in range(0, 130)]
    assert targets[0] == 1.0 and targets[10] == 1.0
    assert targets[110] == pytest.approx(0.4) and targets[-1] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(targets, targets[1:]))
    assert c.target(60) == pytest.approx({"linear": 0.7, "cosine": 0.7, "cubic": 0.4 + 0.6 * 0.125}[shape])


def test_curriculum_state_roundtrip():
    a = Curriculum(final=0.5, steps=10)
    for _ in range(4):
        a.advance()
    b = Curriculum(final=0.5, steps=10)
    b.load_state_dict(a.state_dict())
    assert b.target() == a.target() == pytest.approx(0.8)


def test_curriculum_rejects_impossible_targets():
    with pytest.raises(ValueError, match="1.3"):
        Curriculum(final=1.3)


def test_distillation_losses():
    t = torch.randn(5, 7)
    assert float(kl_logits(t, t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 7, requires_grad=True)
    loss = kl_logits(s, t, tau=2.0)
    loss.backward()
    assert loss > 0 and s.grad.abs().sum() > 0
    # BCE against sigmoid(teacher) is minimised at student == teacher.
    s2 = t.clone().requires_grad_()
    bce_sigmoid(s2, t).backward()
    assert s2.grad.abs().max() < 1e-6
    # Cosine: identical hidden states cost 0; masked positions do not count.
    h = torch.randn(2, 4, 8)
    other = h.clone()
    other[:, 3] = -h[:, 3]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    assert float(hidden_cosine(other, h, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_cosine(other, h)) == pytest.approx(2 * 2 / 8)
    assert math.isfinite(float(hidden_cosine(h, h)))
