"""Micro-benchmark: forward+backward of one training-mode attention call (float key mask),
the former hand-written soft mask ("old", the reference in tests/test_nn_soft_mask.py) vs
SoftMaskedAttention ("new"), with a no-mask call ("plain") for scale. Single thread,
interleaved rounds. Run: PYTHONPATH=. python benchmarks/soft_mask.py"""

import sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_nn_soft_mask import reference
from trim.nn.attention import Attention
torch.set_num_threads(1)
torch.manual_seed(0)

new_fn = Attention._soft_masked_attention
old_fn = lambda self, q, k, v, keep, bias: reference(q, k, v, keep, bias, self.scale)

def step(attn, x, keep, mode):
    xs = x.detach().requires_grad_()
    if mode == "plain":
        out = attn(xs)
    else:
        Attention._soft_masked_attention = new_fn if mode == "new" else old_fn
        out = attn(xs, key_keep=keep.detach().requires_grad_())
    out.sum().backward()

def bench(b, h, n, d, reps, rounds):
    attn = Attention(d, h)
    x = torch.randn(b, n, d)
    keep = (torch.rand(b, n) < 0.6).float(); keep[:, 0] = 1
    modes = ["plain", "old", "new"]
    times = {k: [] for k in modes}
    for m in modes: step(attn, x, keep, m)
    for r in range(rounds):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            t = time.perf_counter()
            for _ in range(reps): step(attn, x, keep, m)
            times[m].append((time.perf_counter() - t) / reps * 1e3)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"B={b} H={h} N={n} D={d}: median ms/fwd+bwd (attention module incl. qkv/proj), {rounds} interleaved rounds x {reps}")
    for k in modes: print(f"  {k:5s} {med[k]:7.2f}   all: {' '.join(f'{t:.2f}' for t in times[k])}")
    print(f"  old/new = {med['old']/med['new']:.2f}x ; new-plain = {med['new']-med['plain']:.2f} ms, old-plain = {med['old']-med['plain']:.2f} ms")

bench(32, 4, 65, 64, reps=10, rounds=7)
bench(4, 12, 197, 768, reps=3, rounds=7)
