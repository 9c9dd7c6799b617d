"""Time and peak memory of LM-Infinite's blocked attention against full attention.

One attention layer with the default model's shapes (9 query heads, 3 kv heads, d_head 64) at
several lengths:

* ``eager`` — full attention with the score matrix materialised (Hugging Face's eager path,
  which is also what a hooked TransformerBridge runs): the baseline;
* ``sdpa`` — full attention through PyTorch's fused kernel (O(n) memory, O(n²) time);
* ``lambda`` — :func:`anchor_lens.lminfinite.lambda_attention_forward`, Λ attention with the
  distance limit (``n_global`` 10, ``n_local`` = ``max_distance`` = ``--n-local``).

Each (method, length) runs in a fresh process: peak memory is the growth of the process's
peak RSS during the first call (inputs already allocated; eager's ``n × n`` causal mask
counts, as Hugging Face builds one for it), time the best of ``--repeats`` further calls.
Ratios are against ``eager`` at the same length.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(method: str, n: int, n_local: int, repeats: int) -> dict:
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from anchor_lens.lminfinite import LambdaAttention, _Runtime, lambda_attention_forward

    torch.manual_seed(0)
    heads, kv_heads, d = 9, 3, 64
    q, k, v = (torch.randn(1, h, n, d) for h in (heads, kv_heads, kv_heads))
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, d, 2) / d))
    module = SimpleNamespace(
        layer_idx=0, scaling=d**-0.5, num_key_value_groups=heads // kv_heads, training=False
    )
    runtime = _Runtime(LambdaAttention(10, n_local, n_local), {0: inv_freq})

    def run():
        with torch.no_grad():
            if method == "eager":  # the n x n causal mask is part of its cost
                causal = torch.full((n, n), torch.finfo(q.dtype).min).triu(1)[None, None]
                return eager_attention_forward(module, q, k, v, causal, scaling=module.scaling)
            if method == "sdpa":
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True
                )
            return lambda_attention_forward(module, q, k, v, None, lm_infinite=runtime)

    before = _peak_mib()
    run()
    peak = _peak_mib() - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"method": method, "n": n, "seconds": min(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--n-local", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-eager", type=int, default=8192, help="longest eager run")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure(args.one[0], int(args.one[1]), args.n_local, args.repeats)))
        return

    print(f"torch threads {torch.get_num_threads()}, n_local {args.n_local}, one layer 9/3 heads")
    print("length  method  seconds  peak MiB  time vs eager  memory vs eager")
    for n in args.lengths:
        rows = {}
        for method in ("eager", "sdpa", "lambda"):
            if method == "eager" and n > args.max_eager:
                continue
            cmd = [sys.executable, __file__, "--one", method, str(n)]
            cmd += ["--n-local", str(args.n_local), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        base = rows.get("eager")
        for method, row in rows.items():
            ratio_t = f"{base['seconds'] / row['seconds']:.2f}x" if base else "-"
            ratio_m = f"{base['peak_mib'] / max(row['peak_mib'], 1):.1f}x" if base else "-"
            print(
                f"{n:6d}  {method:6s}  {row['seconds']:7.3f}  {row['peak_mib']:8.0f}  "
                f"{ratio_t:>13s}  {ratio_m:>15s}"
            )


if __name__ == "__main__":
    main()
