"""Where a batch-1 call goes on a random 11008x4096 3-bit layer: module forward against a direct kernel call,
with 0.5% outliers and without, beside the copy bandwidth of the same process (2 threads, medians of 31).
Run: `python experiments/call_parts.py`."""
import torch
from cmpq.bench.kernels import median_seconds, copy_bandwidth
from cmpq.kernels import native
from cmpq.formats.cmpq import CMPQLinear
from cmpq.formats.synthetic import mixed_widths, random_cmpq_layer
rows, cols = 11008, 4096
torch.set_num_threads(2)
print(f"copy {copy_bandwidth()/1e9:.1f} GB/s")
for bits in (3.0,):
    widths = mixed_widths(cols, bits)
    for nnz in (round(0.005 * rows * cols), 0):
        layer = random_cmpq_layer(rows, cols, widths, nnz=nnz, scale=0.05)
        m = CMPQLinear.from_weight(layer); m.kernel = "native"
        x = torch.randn(1, cols)
        with torch.inference_mode():
            m(x)
            p = m._native
            wbytes = sum(b.numel() * b.element_size() for b in m.buffers())
            t_mod = median_seconds(lambda: m(x), 31)
            t_gemv = median_seconds(lambda: p.gemv(x, None, 2, 2), 31)
        print(f"bits {bits} nnz {nnz}: module {t_mod*1e3:.3f} ms ({wbytes/t_mod/1e9:.1f} GB/s), gemv {t_gemv*1e3:.3f} ms, bytes {wbytes}")
