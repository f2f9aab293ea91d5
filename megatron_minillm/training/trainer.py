"""The trainer: MiniLLM (Algorithm 1 of the paper) and the baselines (SFT, KD, SeqKD, off-policy
reverse KL), one loop for all, read top to bottom.

Every rank runs the same code; the student is TP x PP x DP (megatron DDP + distributed optimizer),
the teacher shares the TP x PP groups, frozen, without DDP or optimizer state. Per-token tensors
that only the loss needs (teacher logits, rewards, advantages) live in the micro-batch dicts of the
last pipeline stage.

MiniLLM iteration: (1) rollouts: teacher-mixed sampling of ``rollout_batch_size`` responses;
(2) scoring: one teacher forward over the rollouts, its vocab-parallel logits cached
(``teacher_cache_dtype``) for the single-step term and its log p(y_t) turned into rewards;
(3) training: ``ppo_epochs`` passes over the rollouts in optimizer steps of ``global_batch_size``,
each micro-batch paired with a pretraining micro-batch for L_PT. LMOps re-runs the teacher every
PPO epoch; here it runs once per rollout batch (plus once per pretraining micro-batch, which is new
data every step).
"""

import logging
import resource
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from tqdm import tqdm

from megatron_minillm.algorithms import minillm
from megatron_minillm.checkpoint.dist_checkpoint import load_model
from megatron_minillm.data import InstructionDataset, PretrainDataset, check_tokenizers_compatible, load_tokenizer
from megatron_minillm.losses import forward_kl, reverse_kl, token_log_probs
from megatron_minillm.parallel import init_distributed
from megatron_minillm.platform import is_cuda
from megatron_minillm.sampling import SamplingParams, generate, sample_seeds
from megatron_minillm.training.checkpointing import PreemptionFlag, load_training_checkpoint, save_training_checkpoint
from megatron_minillm.training.config import ConfigError, TrainConfig
from megatron_minillm.training.optimizer import setup_model_and_optimizer
from megatron_minillm.training.schedule import (
    Batch,
    at_logit_positions,
    forward_backward,
    logit_positions,
    scatter_logit_positions,
    train_step,
)

log = logging.getLogger("megatron_minillm.train")
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Timers:
    """Seconds per phase since the last log line."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def model_checksum(model: torch.nn.Module) -> float:
    """Sum of all weights over the model-parallel group: equal for the same checkpoint at any layout,
    logged so that a teacher that silently failed to load (e.g. all zeros) is caught."""
    total = torch.tensor(sum(p.detach().double().sum().item() for p in model.parameters()), dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.item()


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.layout = init_distributed(tp=cfg.tp, pp=cfg.pp, seed=cfg.seed)
        self.dp, self.dp_rank = self.layout.dp, parallel_state.get_data_parallel_rank()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self._check_batches()
        self.tokenizer = load_tokenizer(cfg.student)
        student, self.arch, self.meta = load_model(cfg.student, dtype=cfg.dtype)
        meta = self.meta
        if cfg.recompute:
            student.config.recompute_granularity, student.config.recompute_method = "full", "uniform"
            student.config.recompute_num_layers = 1
        self.teacher = None
        if cfg.teacher:
            teacher_tokenizer = load_tokenizer(cfg.teacher)
            self.teacher, _, teacher_meta = load_model(cfg.teacher, dtype=cfg.dtype)
            check_tokenizers_compatible(
                teacher_tokenizer, self.tokenizer, teacher_meta.padded_vocab_size, meta.padded_vocab_size, cfg.tp
            )
            self.teacher.eval().requires_grad_(False)
            log.info("teacher %s checksum %.10e", cfg.teacher, model_checksum(self.teacher))
        self.model, self.optimizer, self.scheduler = setup_model_and_optimizer(
            student,
            OptimizerConfig(
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_eps=cfg.adam_eps,
                clip_grad=cfg.clip_grad,
                bf16=cfg.dtype == "bf16",
                use_distributed_optimizer=cfg.use_distributed_optimizer,
            ),
            train_iters=cfg.train_iters * self.steps_per_iteration,
            lr_warmup_iters=cfg.lr_warmup_iters,
            lr_decay_style=cfg.lr_decay_style,
        )
        self.data = InstructionDataset(cfg.data)
        self.pt_data = PretrainDataset(cfg.pt_data, cfg.max_length + 1) if cfg.pt_data and cfg.lm_coef else None
        self.timers = Timers()
        self.rollout_stats: dict[str, float] = {}
        self.preemption = PreemptionFlag()

    # ----------------------------------------------------------------------------------------------
    # layout of the batches

    def _check_batches(self) -> None:
        cfg, per_step = self.cfg, self.cfg.micro_batch_size * self.layout.dp
        if cfg.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size "
                f"x DP = {cfg.micro_batch_size} x {self.layout.dp}"
            )
        if cfg.algorithm == "minillm" and cfg.rollout_batch_size % cfg.global_batch_size:
            raise ConfigError(
                f"rollout_batch_size {cfg.rollout_batch_size} must be a multiple of "
                f"global_batch_size {cfg.global_batch_size}"
            )

    @property
    def steps_per_iteration(self) -> int:
        if self.cfg.algorithm != "minillm":
            return 1
        return self.cfg.ppo_epochs * self.cfg.rollout_batch_size // self.cfg.global_batch_size

    def _sample_ids(self, iteration: int, count: int) -> tuple[list[int], list[int]]:
        """(global sample ids, dataset indices) of this DP rank's share of iteration's ``count`` samples.

        Sample k of the run is example perm_e[k mod N] of epoch e = k // N, with perm_e a seeded
        permutation: the data position is a function of the iteration, which makes resumption exact.
        """
        n = len(self.data)
        ids = [iteration * count + j for j in range(self.dp_rank, count, self.dp)]
        indices = []
        for k in ids:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + k // n)
            indices.append(int(torch.randperm(n, generator=gen)[k % n]))
        return ids, indices

    def _pack(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        kind: str | None = None,
        **per_token: list[list[float]],
    ) -> list[Batch]:
        """Micro-batches [mbs, seq] of prompt + response, right-padded; the loss covers the positions
        that predict response tokens, where ``per_token`` values (one per response token) go, and
        the models compute logits only there ("logit_positions").

        seq is the longest sequence of the call rounded up to a multiple of 8 (one optimizer step's
        micro-batches share it), or max_length at PP > 1, where the pipeline sends fixed-size
        activations. Right padding changes no value at the real positions (causal attention)."""
        cfg = self.cfg
        prompts = [p[: cfg.max_prompt_length] for p in prompts]
        responses = [y[: cfg.max_length + 1 - len(p)] for p, y in zip(prompts, responses)]
        seq = cfg.max_length
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            longest = max((len(p) + len(y) - 1 for p, y in zip(prompts, responses)), default=1)
            seq = min(seq, -(-longest // 8) * 8)
        batches = []
        for start in range(0, len(prompts), cfg.micro_batch_size):
            rows = range(start, min(start + cfg.micro_batch_size, len(prompts)))
            tokens = torch.full((len(rows), seq + 1), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), seq)
            extra = {name: torch.zeros(len(rows), seq) for name in per_token}
            for r, i in enumerate(rows):
                p, y = prompts[i], responses[i]
                tokens[r, : len(p) + len(y)] = torch.tensor(p + y)
                mask[r, len(p) - 1 : len(p) - 1 + len(y)] = 1
                for name, values in per_token.items():
                    extra[name][r, len(p) - 1 : len(p) - 1 + len(y)] = torch.tensor(values[i][: len(y)])
            batches.append(
                {
                    "tokens": tokens[:, :-1],
                    "labels": tokens[:, 1:],
                    "loss_mask": mask,
                    "logit_positions": logit_positions(mask),
                    "kind": kind or cfg.algorithm,
                    "position_ids": torch.arange(seq).expand(len(rows), seq),
                    **extra,
                }
            )
        return batches

    def _pretrain_batches(self, step: int, count: int) -> list[Batch]:
        """``count`` L_PT micro-batches for optimizer step ``step``: chunks (of max_length + 1 tokens)
        with global ids [step G, (step + 1) G), this rank's contiguous share, as the rollouts."""
        mbs, seq, local = self.cfg.micro_batch_size, self.cfg.max_length, self.cfg.global_batch_size // self.dp
        first = step * self.cfg.global_batch_size + self.dp_rank * local
        batches = []
        for m in range(count):
            ids = [(first + m * mbs + r) % len(self.pt_data) for r in range(mbs)]
            chunks = torch.stack([torch.from_numpy(self.pt_data[i]) for i in ids])
            batches.append(
                {
                    "tokens": chunks[:, :-1],
                    "labels": chunks[:, 1:],
                    "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq),
                    "kind": "pt",
                }
            )
        return batches

    def _score_with_teacher(self, batches: list[Batch], keep_logits: bool, token_log_p: bool) -> None:
        """One teacher forward over ``batches``; on the last stage store its logits (cache dtype, at
        the batch's logit positions) and/or its raw log p(label) [b, s] (temperature 1: the reward
        uses the teacher as is)."""
        cfg = self.cfg

        def stash(batch: Batch, logits: torch.Tensor):
            if keep_logits:
                batch["teacher_logits"] = logits.detach().to(CACHE_DTYPES[cfg.teacher_cache_dtype])
            if token_log_p:
                pick = partial(at_logit_positions, batch)
                log_p = token_log_probs(
                    logits.detach().float(),
                    pick(batch["labels"]),
                    pick(batch["loss_mask"]),
                    vocab_size=self.arch.vocab_size,
                )
                batch["log_p"] = scatter_logit_positions(batch, log_p)
            return logits.new_zeros(()), {}

        with torch.no_grad():
            forward_backward(self.teacher, batches, stash, forward_only=True)

    # ----------------------------------------------------------------------------------------------
    # losses (last pipeline stage)

    def _loss(self, batch: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token terms summed and divided by the step's token count over all micro-batches and DP
        ranks (``batch["scale"]``, see :meth:`_normalize`): the gradient is the token mean of the whole
        optimizer step, whatever the micro-batch size or DP layout. Per-token tensors are picked at
        the logit positions (the logits' layout)."""
        cfg, vocab, scale, pick = self.cfg, self.arch.vocab_size, batch["scale"], partial(at_logit_positions, batch)
        mask, labels = pick(batch["loss_mask"]), pick(batch["labels"])
        kind = batch.get("kind", cfg.algorithm)
        teacher = batch["teacher_logits"].to(logits.dtype) if "teacher_logits" in batch else None
        terms: dict[str, torch.Tensor] = {}
        if kind in ("pt", "kd", "sft", "seqkd"):
            terms["lm loss"] = -token_log_probs(logits, labels, mask, vocab_size=vocab)
        if kind in ("pt", "kd"):
            terms["kd loss"] = forward_kl(logits, teacher, mask, vocab_size=vocab)
        if kind == "minillm":
            if cfg.policy_gradient:
                log_q = token_log_probs(logits, labels, mask, temperature=cfg.temperature, vocab_size=vocab)
                terms["pg loss"] = minillm.ppo_clipped_loss(
                    log_q,
                    pick(batch["log_q_old"]),
                    pick(batch["weight"]),
                    pick(batch["advantages"]),
                    mask,
                    cfg.clip_eps,
                )
            if cfg.single_step:  # L_Single: the full-vocabulary reverse KL at every response position
                terms["single-step loss"] = reverse_kl(
                    logits, teacher, mask, temperature=cfg.temperature, vocab_size=vocab
                )
        if kind == "rkl_offpolicy":
            terms["rkl loss"] = reverse_kl(logits, teacher, mask, vocab_size=vocab)
        sums = {name: (value * mask).sum() * scale for name, value in terms.items()}
        if kind in ("pt", "kd"):  # (1 - kd_ratio) CE + kd_ratio forward KL, the L_PT term weighted by lm_coef
            loss = (1 - cfg.kd_ratio) * sums["lm loss"] + cfg.kd_ratio * sums["kd loss"]
            loss = loss * (cfg.lm_coef if kind == "pt" else 1.0)
        else:
            loss = sum(sums.values())
        prefix = "pt " if kind == "pt" else ""
        return loss, {prefix + name: value.detach() for name, value in sums.items()}

    def _normalize(self, batches: list[Batch]) -> None:
        """Give each micro-batch ``scale`` = (micro-batches x DP) / (tokens of its kind in the step
        over all DP ranks), undoing megatron's mean over micro-batches and DP ranks."""
        kinds = sorted({b.get("kind", self.cfg.algorithm) for b in batches})
        counts = torch.tensor(
            [
                sum(float(b["loss_mask"].sum()) for b in batches if b.get("kind", self.cfg.algorithm) == k)
                for k in kinds
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        for b in batches:
            tokens = counts[kinds.index(b.get("kind", self.cfg.algorithm))].item()
            b["scale"] = len(batches) * self.dp / max(tokens, 1.0)

    # ----------------------------------------------------------------------------------------------
    # one iteration of each algorithm

    def _rollouts(self, iteration: int) -> tuple[list[list[int]], "list"]:
        cfg = self.cfg
        ids, indices = self._sample_ids(iteration, cfg.rollout_batch_size)
        prompts = [self.data[i][0][: cfg.max_prompt_length].tolist() for i in indices]
        params = SamplingParams(
            max_new_tokens=cfg.max_length - cfg.max_prompt_length,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            mix_alpha=cfg.mix_alpha,
            stop_ids=(self.tokenizer.eos_id,),
        )
        rollouts = []
        chunks = range(0, len(prompts), cfg.rollout_micro_batch_size)
        for start in tqdm(
            chunks,
            desc=f"rollouts of iteration {iteration + 1}",
            leave=False,
            disable=dist.get_rank() != 0 or len(chunks) < 2,
        ):
            chunk = slice(start, start + cfg.rollout_micro_batch_size)
            seeds = sample_seeds(cfg.seed + 7919 * (iteration + 1), torch.tensor(ids[chunk]))
            rollouts.append(
                generate(
                    self.model,
                    prompts[chunk],
                    params,
                    seeds,
                    vocab_size=self.arch.vocab_size,
                    teacher=self.teacher if cfg.mix_alpha else None,
                    pad_id=self.tokenizer.pad_id,
                )
            )
        return prompts, rollouts

    def _minillm_iteration(self, iteration: int) -> list[dict]:
        cfg = self.cfg
        start = time.perf_counter()
        prompts, rollouts = self._rollouts(iteration)
        responses, log_q_old, weights = [], [], []
        for r in rollouts:
            for row in range(r.tokens.shape[0]):
                keep = r.mask[row]
                responses.append(r.tokens[row][keep].tolist())
                log_q_old.append(r.log_q[row][keep].tolist())
                weights.append((r.log_q[row][keep] - r.log_mix[row][keep]).exp().tolist())  # w_t = q / p~
        self.timers.add("rollout", start)

        # Optimizer step k takes the rollouts with global ids [k G, (k + 1) G): this rank's share of
        # them is a contiguous slice, so the steps are the same sets of samples at any DP size.
        start = time.perf_counter()
        local = cfg.global_batch_size // self.dp
        steps = [
            self._pack(
                prompts[i : i + local],
                responses[i : i + local],
                log_q_old=log_q_old[i : i + local],
                weight=weights[i : i + local],
                kind="minillm",
            )
            for i in range(0, len(prompts), local)
        ]
        scored = [b for step in steps for b in step]
        self._score_with_teacher(scored, keep_logits=cfg.single_step, token_log_p=True)
        if self.is_last_stage:
            for b in scored:
                b["rewards"] = minillm.token_rewards(
                    b["log_p"], b["log_q_old"], b["loss_mask"], cfg.reward_scaling, cfg.reward_clip
                )
        self.rollout_stats = self._rollout_stats(scored, responses)
        self.timers.add("score", start)

        # Each PPO epoch visits the steps in a new order (LMOps reshuffles the buffer; keeping the
        # sets is what makes DP layouts agree).
        start = time.perf_counter()
        metrics = []
        for epoch in range(cfg.ppo_epochs):
            gen = torch.Generator().manual_seed(cfg.seed + 104729 * iteration + epoch)
            for k in torch.randperm(len(steps), generator=gen).tolist():
                micro = [dict(b) for b in steps[k]]
                if self.is_last_stage and cfg.policy_gradient:
                    self._advantages(micro)
                if self.pt_data is not None:
                    pt = self._pretrain_batches(int(self.scheduler.num_steps), len(micro))
                    self._score_with_teacher(pt, keep_logits=True, token_log_p=False)
                    micro = [m for pair in zip(micro, pt) for m in pair]
                self._normalize(micro)
                step_metrics, _ = train_step(
                    self.model, self.optimizer, self.scheduler, micro, self._loss, where=f"iteration {iteration + 1}"
                )
                metrics += step_metrics
        self.timers.add("train", start)
        return metrics

    def _advantages(self, batches: list[Batch]) -> None:
        """A_t of one optimizer step, from the stored rewards: discounted returns, length-normalised,
        whitened over the step's tokens on all DP ranks."""
        cfg = self.cfg
        mask = torch.cat([b["loss_mask"] for b in batches])
        returns = minillm.discounted_returns(torch.cat([b["rewards"] for b in batches]), mask, cfg.gamma)
        if cfg.length_norm:
            returns = minillm.length_normalized(returns, mask)
        if cfg.whiten:
            returns = minillm.whiten(returns, mask, parallel_state.get_data_parallel_group())
        for b, a in zip(batches, returns.split([b["loss_mask"].shape[0] for b in batches])):
            b["advantages"] = a

    def _rollout_stats(self, batches: list[Batch], responses: list[list[int]]) -> dict[str, float]:
        """Mean reward, reverse KL to the teacher on the samples (mean of log q - log p) and length."""
        stats = torch.tensor(
            [0.0, 0.0, 0.0, float(sum(map(len, responses))), float(len(responses))], dtype=torch.float64
        )
        if self.is_last_stage:
            for b in batches:
                m = b["loss_mask"]
                stats[0] += (b["rewards"] * m).sum()
                stats[1] += ((b["log_q_old"] - b["log_p"]) * m).sum()
                stats[2] += m.sum()
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        tokens = max(stats[2].item(), 1.0)
        return {
            "reward": stats[0].item() / tokens,
            "rkl to teacher": stats[1].item() / tokens,
            "response length": stats[3].item() / max(stats[4].item(), 1.0),
        }

    def _supervised_iteration(self, iteration: int) -> list[dict]:
        cfg = self.cfg
        start = time.perf_counter()
        ids, indices = self._sample_ids(iteration, cfg.global_batch_size)
        pairs = [self.data[i] for i in indices]
        prompts = [p[: cfg.max_prompt_length].tolist() for p, _ in pairs]
        responses = [r.tolist() for _, r in pairs]
        if cfg.algorithm == "seqkd":  # SFT on the teacher's own samples (alpha = 1), fixed per example
            params = SamplingParams(
                max_new_tokens=cfg.max_length - cfg.max_prompt_length,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                stop_ids=(self.tokenizer.eos_id,),
            )
            rollout = generate(
                self.teacher,
                prompts,
                params,
                sample_seeds(cfg.seed, torch.tensor(indices)),
                vocab_size=self.arch.vocab_size,
                pad_id=self.tokenizer.pad_id,
            )
            responses = rollout.responses()
        self.timers.add("rollout", start)
        start = time.perf_counter()
        batches = self._pack(prompts, responses)
        if cfg.algorithm in ("kd", "rkl_offpolicy"):
            self._score_with_teacher(batches, keep_logits=True, token_log_p=False)
        self.timers.add("score", start)
        start = time.perf_counter()
        self._normalize(batches)
        metrics, _ = train_step(
            self.model, self.optimizer, self.scheduler, batches, self._loss, where=f"iteration {iteration + 1}"
        )
        self.timers.add("train", start)
        self.rollout_stats = {"response length": sum(map(len, responses)) / max(len(responses), 1)}
        return metrics

    # ----------------------------------------------------------------------------------------------

    def iteration(self, iteration: int) -> dict[str, float]:
        """Run one iteration; return its metrics averaged over micro-batches and DP ranks (last stage)."""
        run = self._minillm_iteration if self.cfg.algorithm == "minillm" else self._supervised_iteration
        metrics = run(iteration)
        names = sorted({k for m in metrics for k in m})
        # Each micro-batch carries its share of the step's token mean: the mean over micro-batches
        # (and DP ranks) is the token mean of the step, averaged over the iteration's steps.
        values = torch.tensor(
            [sum(float(m.get(k, 0.0)) for m in metrics) / max(len(metrics), 1) for k in names], dtype=torch.float64
        )
        if self.is_last_stage and names:
            dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
            values /= self.dp
        out = dict(zip(names, values.tolist()))
        out.update(self.rollout_stats)
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def run(self) -> dict[str, float]:
        """Train from the latest checkpoint in ``save`` (if any) to ``train_iters``; return the last metrics."""
        cfg = self.cfg
        start_iteration = self._resume()
        writer = self._tensorboard()
        metrics: dict[str, float] = {}
        last_log = time.perf_counter()
        for iteration in range(start_iteration, cfg.train_iters):
            metrics = self.iteration(iteration)
            if (iteration + 1) % cfg.log_interval == 0 or iteration + 1 == cfg.train_iters:
                elapsed = time.perf_counter() - last_log
                self._log(iteration + 1, metrics, elapsed, writer)
                last_log, self.timers = time.perf_counter(), Timers()
            final = iteration + 1 == cfg.train_iters
            stop = self.preemption.should_stop()  # collective: every rank, every iteration
            if cfg.save and (final or stop or (cfg.save_interval and (iteration + 1) % cfg.save_interval == 0)):
                self._save(iteration + 1)
            if stop and not final:
                log.info("SIGTERM: stopping after iteration %d%s", iteration + 1, " (saved)" if cfg.save else "")
                break
        return metrics

    def _resume(self) -> int:
        """The iteration to start from: that of the latest checkpoint in ``save``, else 0."""
        if not self.cfg.save:
            return 0
        found = load_training_checkpoint(self.cfg.save, self.model, self.optimizer, self.scheduler, self.arch)
        if found is None:
            return 0
        iteration, _ = found
        log.info("resumed from %s at iteration %d", self.cfg.save, iteration)
        return iteration

    def _save(self, iteration: int) -> None:
        """Model, optimizer, scheduler, RNG states and the resolved config; the data position is
        the iteration itself (see :meth:`_sample_ids`)."""
        state = {"iteration": iteration, "config": self.cfg.to_dict()}
        save_training_checkpoint(
            self.cfg.save,
            iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            metadata=self.meta,
            hf_dir=self.cfg.student,
        )

    def _log(self, iteration: int, metrics: dict[str, float], elapsed: float, writer) -> None:
        if dist.get_rank() != dist.get_world_size() - 1:  # the last rank holds the last stage's metrics
            return
        shares = self.timers.seconds
        total = sum(shares.values()) or 1.0
        samples = self.cfg.rollout_batch_size if self.cfg.algorithm == "minillm" else self.cfg.global_batch_size
        tokens_per_s = metrics.get("response length", 0.0) * samples * self.cfg.log_interval / max(elapsed, 1e-9)
        parts = [f"iteration {iteration:6d}/{self.cfg.train_iters}", f"lr {metrics['lr']:.3e}"]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k != "lr"]
        parts.append(
            "rollout/score/train "
            + "/".join(f"{100 * shares.get(k, 0.0) / total:.0f}" for k in ("rollout", "score", "train"))
            + " %"
        )
        parts += [
            f"response tokens/s {tokens_per_s:.1f}",
            f"peak mem {self._peak_memory_gb():.2f} GB",
            f"elapsed {elapsed:.1f} s",
        ]
        print(" | ".join(parts), flush=True)
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k.replace(" ", "_"), v, iteration)
            writer.flush()

    def _tensorboard(self):
        if not self.cfg.tensorboard_dir or dist.get_rank() != dist.get_world_size() - 1:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.cfg.tensorboard_dir)

    @staticmethod
    def _peak_memory_gb() -> float:
        if is_cuda():
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
