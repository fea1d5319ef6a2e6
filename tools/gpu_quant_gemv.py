"""GPU: the 8-bit weight kernel (layers/triton_quant.py) against bf16 cuBLAS on the 3B's linear
shapes, at decode row counts. Prints us per call and achieved weight bandwidth (bytes of the
weight read / time), each timed as a CUDA graph of 20 calls (no launch overhead), and the
relative error against dequantize-then-matmul.

    python tools/gpu_quant_gemv.py [--mode int8|fp8] [--rows 1,8,64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from omnistream.layers.quant import dequantize_rows, quantize_rows
from omnistream.layers.triton_quant import split_plan, w8_linear, _sm_count

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008), "lm_head": (151936, 2048)}
CALLS = 20


def graph_us(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="int8", choices=("int8", "fp8"))
    ap.add_argument("--rows", default="1,8,64")
    args = ap.parse_args()
    sms = _sm_count(torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name()}: {sms} SMs; {args.mode} weights vs bf16, CUDA graph of {CALLS} calls")
    print(f"{'shape':<9}{'N x K':>14}{'rows':>6}{'splits':>8}{'bf16 us':>10}{'GB/s':>8}{'w8 us':>10}{'GB/s':>8}{'speedup':>9}{'rel err':>10}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, s = quantize_rows(w, args.mode, torch.bfloat16)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t16 = graph_us(lambda: F.linear(x, w))
            t8 = graph_us(lambda: w8_linear(x, q, s, None))
            ref = F.linear(x.float(), dequantize_rows(q, s).float())
            err = ((w8_linear(x, q, s, None).float() - ref).norm() / ref.norm()).item()
            print(f"{name:<9}{f'{n}x{k}':>14}{m:>6}{split_plan(n, k, sms)[0]:>8}{t16:>10.1f}{2 * n * k / t16 / 1e3:>8.0f}"
                  f"{t8:>10.1f}{n * k / t8 / 1e3:>8.0f}{t16 / t8:>8.2f}x{err:>10.1e}")


if __name__ == "__main__":
    main()
