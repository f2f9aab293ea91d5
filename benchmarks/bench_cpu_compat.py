"""Cost of the two ways to run megatron-core on CPU (see platform/cpu_compat.py).

    python benchmarks/bench_cpu_compat.py

(a) ours: megatron modules' `torch` global is a proxy whose factories map cuda -> cpu; the rest of
    the process runs unpatched torch.
(b) the alternative: a TorchFunctionMode that rewrites `device=` of every torch call, active around
    the whole step (as it would have to be).
Both run the same forward+backward of a small LLaMA-style GPTModel (single process, gloo); the last
line is one JSON with the ratio (b)/(a).
"""

import json
import os
import time

import torch
from torch.overrides import TorchFunctionMode


class CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import destroy_distributed, init_distributed
    from megatron_minillm.smoke import llama_config

    init_distributed()
    torch.set_num_threads(2)
    model = build_model(architecture_from_dict(llama_config(layers=4, hidden=256, heads=8, kv_heads=4)))
    result = {}
    # A training-sized step, and a decode-sized one where per-op Python overhead dominates.
    for name, (batch, seq, repeats) in {"train_4x128": (4, 128, 10), "decode_1x8": (1, 8, 50)}.items():
        tokens = torch.randint(0, 256, (batch, seq))
        pos = torch.arange(seq).expand(batch, seq)

        def step() -> None:
            model(tokens, pos, None).float().pow(2).mean().backward()

        def timed() -> float:
            step()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            return (time.perf_counter() - start) / repeats

        ours = timed()
        with CudaToCpuMode():
            mode = timed()
        print(f"{name}: proxy (ours) {ours * 1e3:.2f} ms/step, TorchFunctionMode {mode * 1e3:.2f} ms/step")
        result[f"function_mode_vs_proxy_{name}"] = round(mode / ours, 3)
    print(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
