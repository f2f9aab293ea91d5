"""Cluster smoke test: a teacher and a student, each TP x PP over the same ranks, forward + backward.

    torchrun --nproc-per-node 4 -m megatron_minillm.smoke --tp 2 --pp 2

Both models are random-init LLaMA-style configs (built exactly as from an HF ``config.json``), fed
with UTF-8 bytes of a short English text. Each iteration runs the frozen teacher forward-only and
the student forward/backward + AdamW step through megatron's pipeline schedule, and prints both
language-model losses. It needs no checkpoint and no data: a first check that a new cluster's
launcher, process groups and collectives work before a real run (``scripts/demo.sh`` is the
end-to-end distillation).
"""

import argparse
import time

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from megatron_minillm.data.micro_batch import MicroBatch
from megatron_minillm.losses import masked_lm_loss
from megatron_minillm.models import architecture_from_dict, build_model
from megatron_minillm.parallel import destroy_distributed, init_distributed
from megatron_minillm.platform import device

TEXT = (
    "Knowledge distillation trains a small student model to imitate a large teacher. MiniLLM "
    "minimises the reverse Kullback-Leibler divergence, so the student samples its own answers and "
    "learns from the teacher's judgement of them, instead of spreading its mass over everything the "
    "teacher might say. "
)


def llama_config(layers: int, hidden: int, heads: int, kv_heads: int) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 256,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def byte_batches(num: int, batch: int, seq: int, seed: int) -> list[MicroBatch]:
    """Micro-batches of byte windows from TEXT (same on every rank for a given seed)."""
    data = torch.tensor(list((TEXT * 8).encode()), dtype=torch.long, device="cpu")  # host: windows are cut there
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen, device="cpu")  # host: indices
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        out.append(
            MicroBatch(
                tokens=window[:, :-1].to(device()),
                labels=window[:, 1:].to(device()),
                loss_mask=torch.ones(batch, seq, device=device()),
                position_ids=torch.arange(seq, device=device()).expand(batch, seq),
                kind="lm",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    from megatron_minillm.training import forward_backward, setup_model_and_optimizer, train_step

    layout = init_distributed(tp=args.tp, pp=args.pp)
    teacher_arch = architecture_from_dict(llama_config(layers=4, hidden=128, heads=4, kv_heads=2))
    student_arch = architecture_from_dict(llama_config(layers=2, hidden=64, heads=4, kv_heads=2))
    teacher = build_model(teacher_arch).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, optimizer, scheduler = setup_model_and_optimizer(
        build_model(student_arch),
        OptimizerConfig(lr=args.lr, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0),
        train_iters=args.iterations,
    )

    def loss_func(vocab_size: int):
        def lm(batch, logits):
            loss = masked_lm_loss(logits, batch.labels, batch.loss_mask, vocab_size)
            return loss, {"lm loss": loss.detach().clone()}

        return lm

    def mean_loss(metrics: list[dict]) -> float:
        """Mean LM loss on the last pipeline stage, averaged over DP, known on every rank."""
        local = torch.tensor([sum(m["lm loss"].item() for m in metrics) / max(len(metrics), 1)], device=device())
        torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(local, src, group=parallel_state.get_pipeline_model_parallel_group())
        return local.item() / layout.dp

    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        print(f"layout: TP={layout.tp} PP={layout.pp} DP={layout.dp} on {layout.world_size} ranks")
    dp_rank = parallel_state.get_data_parallel_rank()
    for it in range(1, args.iterations + 1):
        start = time.perf_counter()
        batches = byte_batches(args.micro_batches, args.micro_batch_size, args.seq_length, seed=it)
        with torch.no_grad():
            teacher_loss = mean_loss(
                forward_backward(teacher, batches, loss_func(teacher_arch.vocab_size), forward_only=True)
            )
        student_metrics, grad_norm = train_step(
            student, optimizer, scheduler, batches, loss_func(student_arch.vocab_size)
        )
        student_loss = mean_loss(student_metrics)
        if rank0:
            print(
                f" iteration {it:3d}/{args.iterations} | teacher lm loss {teacher_loss:.4f} | "
                f"student lm loss {student_loss:.4f} | grad norm {grad_norm:.3f} | "
                f"lr {scheduler.get_lr(optimizer.param_groups[0]):.2e} | "
                f"{time.perf_counter() - start:.2f} s (dp rank {dp_rank})",
                flush=True,
            )
    destroy_distributed()


if __name__ == "__main__":
    main()
