"""A/B of two kernel builds: batch-1/4 LUT-GEMV of a random 11008x4096 layer (0.5% outliers), 3 and 4 bits.

Copy `src` (with its built extension) to another directory, change and rebuild one copy, then alternate
`PYTHONPATH=<tree>/src python experiments/kernel_ab.py` between the two trees; each line prints the
tree's name and median ms per call over 31 repeats.
"""
import sys, torch, cmpq
from cmpq.bench.kernels import median_seconds
from cmpq.formats.cmpq import CMPQLinear
from cmpq.formats.synthetic import mixed_widths, random_cmpq_layer
rows, cols = 11008, 4096
out = []
for bits in (3.0, 4.0):
    layer = random_cmpq_layer(rows, cols, mixed_widths(cols, bits), nnz=round(0.005 * rows * cols), scale=0.05)
    m = CMPQLinear.from_weight(layer); m.kernel = "native"
    with torch.inference_mode():
        for b in (1, 4):
            x = torch.randn(b, cols)
            m(x)
            out.append(f"{bits}/b{b} {median_seconds(lambda: m(x), 31)*1e3:.3f}")
print(cmpq.__file__.rsplit('/src/', 1)[0], " ".join(out))
