"""Cost of the vocab-parallel reverse KL (forward + backward) against the naive way and a memory pass.

    python benchmarks/bench_losses.py [--batch 4] [--seq 512] [--vocab 32000 49152] [--repeats 3]

Variants, all on the same fp32 logits [b, s, V/TP] (student with grad, teacher without), token mean:
(a) ours: ``losses.reverse_kl(...).backward()`` with the default options (at TP=1 the hand-written CPU
    kernel), the same with an upstream gradient != 1 (``(loss * 0.5).backward()``: the backward
    scales the gradient), the torch.compile'd chunk kernels (``KernelOptions(compiled=True,
    cpu_kernel=False)``) and the eager ones (``KernelOptions(cpu_kernel=False)``); compile and build
    time is excluded from the timing and reported apart (first step);
(b) naive: gather the full vocabulary, torch log_softmax + autograd (what LMOps and TRL do);
(c) bandwidth: read both logit tensors and write one gradient into a preallocated buffer
    (``torch.add(z, t, out=g)``), the memory-bound floor of any loss that returns a gradient;
(d) the arithmetic floor: one exponential of every logit of one tensor, ``torch.exp(z, out=g)`` eager
    and compiled (the reverse KL needs two per logit: exp(z - max) and exp(t - max)).

Every measurement runs in a fresh process. Time: best of ``--repeats`` steps after one warm-up step,
each followed by the memory pass (c) in the same process, whose best is the row's paired bandwidth
time (the ``*_vs_bandwidth`` ratios divide by it), under two allocator settings: glibc's default (each tensor of > 32 MiB is a fresh mmap, so every
step pays first-touch page faults for its gradient and temporaries) and a caching setting
(``GLIBC_TUNABLES`` with huge mmap/trim thresholds: freed memory is reused, as PyTorch's CUDA
caching allocator does on GPU). Peak memory: the rise of the process' resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) over one warm step, with every allocation of
>= 64 KiB its own mmap, so that RSS follows live tensor memory. Only megatron's TP group is set up
(no model, no platform layer). The last line is one JSON with the ratios.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CACHING = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
PRECISE = "glibc.malloc.mmap_threshold=65536"
OURS = {
    "ours": {},
    "ours_scaled": {},
    "ours_compiled": dict(compiled=True, cpu_kernel=False),
    "ours_eager": dict(cpu_kernel=False),
}
VARIANTS = (*OURS, "naive", "bandwidth", "exp_eager", "exp_compiled")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _GatherVocab(torch.autograd.Function):
    """All-gather the vocabulary slices; backward keeps this rank's slice (megatron's gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(tp)]
        torch.distributed.all_gather(parts, x.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        rank = parallel_state.get_tensor_model_parallel_rank()
        return grad.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=-1)[rank]


def _step_fn(variant: str, student: torch.Tensor, teacher: torch.Tensor):
    import megatron_minillm.losses as L

    if variant in ("bandwidth", "exp_eager", "exp_compiled"):
        out = torch.empty_like(student)
        if variant == "bandwidth":
            return lambda: torch.add(student, teacher, out=out)
        if variant == "exp_eager":
            return lambda: torch.exp(student, out=out)
        exp = torch.compile(lambda z, g: g.copy_(torch.exp(z)))
        return lambda: exp(student, out)
    if variant == "naive":

        def naive() -> None:
            x = student.detach().requires_grad_()
            log_q = torch.log_softmax(_GatherVocab.apply(x), -1)
            log_p = torch.log_softmax(_GatherVocab.apply(teacher), -1)
            (log_q.exp() * (log_q - log_p)).sum(-1).mean().backward()

        return naive

    options = L.KernelOptions(**OURS[variant])
    upstream = 0.5 if variant == "ours_scaled" else 1.0

    def ours() -> None:
        x = student.detach().requires_grad_()
        (L.reverse_kl(x, teacher, options=options) * upstream).backward()

    return ours


def worker(config: dict) -> None:
    """One measurement in this process; prints one JSON line."""
    from megatron.core import parallel_state

    from megatron_minillm.parallel import init_distributed

    tp = int(os.environ["WORLD_SIZE"])
    init_distributed(tp=tp)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    rank, vocab, shard = parallel_state.get_tensor_model_parallel_rank(), config["vocab"], config["vocab"] // tp
    gen = torch.Generator().manual_seed(0)
    shape = (config["batch"], config["seq"], vocab)
    student = (torch.randn(shape, generator=gen) * 2)[..., rank * shard : (rank + 1) * shard].clone()
    teacher = (torch.randn(shape, generator=gen) * 2)[..., rank * shard : (rank + 1) * shard].clone()
    step = _step_fn(config["variant"], student, teacher)
    start = time.perf_counter()
    step()  # warm-up (and compilation)
    result = {"warmup_s": time.perf_counter() - start}
    if config["measure"] == "time":
        # Each step is paired with a memory pass in this process, right after it: on a shared machine
        # the ratio of the two minima holds up much better than times taken minutes apart.
        reference = _step_fn("bandwidth", student, teacher) if tp == 1 else lambda: None
        reference()
        times, references = [], []
        for _ in range(config["repeats"]):
            torch.distributed.barrier()
            start = time.perf_counter()
            step()
            middle = time.perf_counter()
            reference()
            times.append(middle - start)
            references.append(time.perf_counter() - middle)
        result.update(time_s=min(times), bandwidth_s=min(references))
    else:
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        step()
        result["peak_mib"] = (_status_kib("VmHWM") - before) / 1024
    print("RESULT " + json.dumps(result), flush=True)
    torch.distributed.destroy_process_group()


def measure(config: dict, tp: int, malloc: str, cache_dir: str) -> dict:
    """Run ``config`` on ``tp`` fresh processes; return rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        WORLD_SIZE=str(tp),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLIBC_TUNABLES=malloc,
        TORCHINDUCTOR_CACHE_DIR=cache_dir,
        PYTHONWARNINGS="ignore",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(config)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(tp)
    ]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{config} at TP{tp} failed:\n" + "\n".join(outputs))
    line = next(x for x in outputs[0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    cache_dir = tempfile.mkdtemp(prefix="bench-losses-inductor-")  # one compilation for all processes
    base = {"batch": args.batch, "seq": args.seq, "repeats": args.repeats}
    table: dict = {}
    for vocab in args.vocab:
        for variant in VARIANTS:
            config = dict(base, vocab=vocab, variant=variant)
            default = measure(dict(config, measure="time"), 1, "", cache_dir)
            caching = measure(dict(config, measure="time"), 1, CACHING, cache_dir)
            row = {
                "time_default_s": default["time_s"],
                "time_caching_s": caching["time_s"],
                "paired_bandwidth_s": caching["bandwidth_s"],
                "peak_mib": measure(dict(config, measure="memory"), 1, PRECISE, cache_dir)["peak_mib"],
                "first_step_s": default["warmup_s"],  # the compiled variants' first is a cold compile
            }
            table[(vocab, variant)] = row
            print(f"V={vocab:6d} {variant:14s} " + "  ".join(f"{k} {v:8.3f}" for k, v in row.items()), flush=True)
    vocab = args.vocab[-1]
    for variant in ("ours", "naive"):  # per-rank memory and time at TP=2
        # at most 3 repeats: under the caching setting naive's resident memory grows with every step here
        config = dict(base, vocab=vocab, variant=variant, repeats=min(args.repeats, 3))
        row = {
            "time_caching_s": measure(dict(config, measure="time"), 2, CACHING, cache_dir)["time_s"],
            "peak_mib": measure(dict(config, measure="memory"), 2, PRECISE, cache_dir)["peak_mib"],
        }
        table[(vocab, variant + "_tp2")] = row
        print(f"V={vocab:6d} {variant + ' TP2/rank':14s} " + "  ".join(f"{k} {v:8.3f}" for k, v in row.items()))

    def ratio(a: str, b: str, key: str) -> float:
        return round(table[(vocab, a)][key] / table[(vocab, b)][key], 3)

    def vs_bandwidth(a: str) -> float:
        return round(table[(vocab, a)]["time_caching_s"] / table[(vocab, a)]["paired_bandwidth_s"], 3)

    print(f"\nratios at {args.batch} x {args.seq} tokens, V = {vocab}, TP=1:")
    summary = {
        "time_vs_bandwidth": vs_bandwidth("ours"),
        "time_vs_naive": ratio("ours", "naive", "time_caching_s"),
        "peak_mem_vs_naive": ratio("ours", "naive", "peak_mib"),
        "scaled_upstream_time_vs_bandwidth": vs_bandwidth("ours_scaled"),
        "compiled_time_vs_bandwidth": vs_bandwidth("ours_compiled"),
        "eager_time_vs_bandwidth": vs_bandwidth("ours_eager"),
        "eager_time_vs_naive": ratio("ours_eager", "naive", "time_caching_s"),
        "eager_peak_mem_vs_naive": ratio("ours_eager", "naive", "peak_mib"),
        "default_malloc_time_vs_naive": ratio("ours", "naive", "time_default_s"),
        "exp_eager_vs_bandwidth": vs_bandwidth("exp_eager"),
        "exp_compiled_vs_bandwidth": vs_bandwidth("exp_compiled"),
        "tp2_per_rank_peak_mem_vs_tp1": ratio("ours_tp2", "ours", "peak_mib"),
    }
    for key, value in summary.items():
        print(f"  {key:36s} {value}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
