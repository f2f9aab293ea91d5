"""The trainer: one loop for every algorithm, read top to bottom; the algorithm is an
:class:`~megatron_minillm.algorithms.Objective` (its batch kinds and its loss), not a branch here.

Every rank runs the same code; the student is TP x PP x DP (megatron DDP + distributed optimizer),
the teacher (``training.teacher``) is frozen, without DDP or optimizer state, on the student's TP x PP
groups or on its own layout, and delivers its outputs in the student's layout. Per-token tensors
that only the loss needs (teacher logits, rewards, advantages) live in the micro-batches of the
last pipeline stage.

An iteration of an on-policy objective (MiniLLM, Algorithm 1): (1) rollouts: teacher-mixed sampling
of ``rollout.batch_size`` responses; (2) scoring: one teacher forward over the rollouts, keeping
what the objective's loss reads (vocab-parallel logits in ``training.teacher_cache_dtype``, log p);
(3) training: ``objective.epochs`` passes over the rollouts in optimizer steps of
``training.global_batch_size``, each micro-batch paired with a pretraining micro-batch when the
objective has one (L_PT). LMOps re-runs the teacher every PPO epoch; here it runs once per rollout
batch (plus once per pretraining micro-batch, which is new data every step). Any other objective
trains one optimizer step per iteration on the dataset's responses or the teacher's samples.
"""

import dataclasses
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from torch import Tensor
from tqdm import tqdm

from megatron_minillm.algorithms import OBJECTIVES, BatchKind, token_normalize
from megatron_minillm.checkpoint.dist_checkpoint import load_model, read_metadata
from megatron_minillm.config import ConfigError, TrainConfig
from megatron_minillm.data import (
    InstructionDataset,
    PretrainDataset,
    check_dataset_matches,
    check_tokenizers_compatible,
    load_tokenizer,
)
from megatron_minillm.data.micro_batch import MicroBatch, pack, sequence_length
from megatron_minillm.losses import reverse_kl
from megatron_minillm.models import Architecture, load_architecture
from megatron_minillm.models.builder import DTYPES, check_layout
from megatron_minillm.parallel import LayoutError, ParallelLayout, init_distributed
from megatron_minillm.parallel.initialize import env_from_slurm
from megatron_minillm.paths import check_output_path
from megatron_minillm.planning.memory import stage_parameters
from megatron_minillm.platform import device, is_cuda
from megatron_minillm.sampling import Rollout, generate, sample_seeds
from megatron_minillm.sampling.rollout import SpeculationStats
from megatron_minillm.training.checkpointing import PreemptionFlag, load_training_checkpoint, save_training_checkpoint
from megatron_minillm.training.guardrails import (
    LENGTH_RATIO,
    OWN_RKL,
    PROBE_RKL,
    Check,
    CollapseError,
    Guardrails,
    distinct_n,
)
from megatron_minillm.training.optimizer import setup_model_and_optimizer
from megatron_minillm.training.schedule import forward_outputs, train_step
from megatron_minillm.training.teacher import Teacher, set_teacher_outputs

log = logging.getLogger("megatron_minillm.train")

# The guardrails' fixed teacher samples: scored by the teacher, then by the student (no loss).
PROBE = BatchKind("probe", "sampled", logit_losses=0, teacher_logits=True)
OFF_POLICY_CHECK_INTERVAL = 20  # guardrails.interval=0 for objectives whose iteration is one optimizer step


@dataclass
class Timers:
    """Seconds per phase since the last log line."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def response_tensors(rollout: Rollout) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per sample: the response ids, log q of each token and the importance weight w_t = q / p~
    (1-D tensors, views of the rollout's rows up to the stop token)."""
    lengths = rollout.mask.sum(1).tolist()  # host-side: the row lengths, to slice with
    weights = (rollout.log_q - rollout.log_mix).exp()
    rows = range(len(lengths))
    return (
        [rollout.tokens[i, : lengths[i]] for i in rows],
        [rollout.log_q[i, : lengths[i]] for i in rows],
        [weights[i, : lengths[i]] for i in rows],
    )


# A training checkpoint holds, per parameter, the weight in the training dtype plus fp32 main
# params and Adam's two moments (the optimizer state in full, gathered from its DP shards).
OPTIMIZER_BYTES_PER_PARAM = 12


def checkpoint_bytes(ckpt: str, dtype: str) -> int:
    """About what one training checkpoint of the model in ``ckpt`` takes on disk."""
    meta = read_metadata(ckpt)
    arch = load_architecture(ckpt)
    params = sum(stage_parameters(arch, 1, 1, 0, padded_vocab=meta.padded_vocab_size).values())
    return params * (DTYPES[dtype].itemsize + OPTIMIZER_BYTES_PER_PARAM)


def check_inputs(cfg: TrainConfig) -> None:
    """What can fail before any model loads (minutes for a large teacher), checked first: the paths,
    both checkpoints complete, ``training.max_length`` within both models' context (from their
    config.json), and the outputs writable, with room for a checkpoint."""
    cfg.check_paths()
    env_from_slurm(os.environ)  # under srun the world size is SLURM's, as init_distributed reads it
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layouts = {"student": (cfg.parallel.tp, cfg.parallel.pp), "teacher": cfg.parallel.teacher_layout}
    for role in ("student", "teacher"):
        path = getattr(cfg, role)
        if not path:
            continue
        meta, arch = read_metadata(path), load_architecture(path)
        check_model_layout(role, path, arch, meta.padded_vocab_size, *layouts[role], world_size)
        context = arch.max_position_embeddings
        if cfg.training.max_length > context:
            raise ConfigError(
                f"training.max_length={cfg.training.max_length} exceeds the {role}'s context of {context} "
                f"positions ({path}/config.json); lower training.max_length (and training.max_prompt_length)"
            )
    if cfg.checkpoint.save:
        size = checkpoint_bytes(cfg.student, cfg.training.dtype)
        check_output_path(cfg.checkpoint.save, "checkpoint.save", exist_ok=True, expected_bytes=size)
    if cfg.logging.tensorboard_dir:
        check_output_path(cfg.logging.tensorboard_dir, "logging.tensorboard_dir", exist_ok=True)


def check_model_layout(
    role: str, path: str, arch: Architecture, padded_vocab: int, tp: int, pp: int, world_size: int
) -> None:
    """One model's TP x PP on ``world_size`` ranks: an error naming the model and what does not divide."""
    try:
        ParallelLayout(tp=tp, pp=pp, world_size=world_size)
        check_layout(arch, tp, pp)
        if padded_vocab % tp:
            raise LayoutError(
                f"TP={tp} does not divide the padded vocabulary {padded_vocab}; re-convert with a "
                "--make-vocab-size-divisible-by that every TP in use divides"
            )
    except LayoutError as err:
        raise LayoutError(f"the {role} ({path}) at TP={tp} x PP={pp}: {err}") from None


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        check_inputs(cfg)
        self.cfg = cfg
        self.layout = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.seed)
        self.dp, self.dp_rank = self.layout.dp, parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.device = device()
        self.tokenizer = load_tokenizer(cfg.student)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        vocab_size = load_architecture(cfg.student).vocab_size
        self.objective = OBJECTIVES[cfg.algorithm](cfg, vocab_size, tp_group=self.tp_group)
        self._check_batches()
        # The data before the models: a wrong prefix or another tokenizer's dataset fails in seconds,
        # not after loading a teacher.
        limits = {"max_prompt_length": cfg.training.max_prompt_length, "max_length": cfg.training.max_length}
        check_dataset_matches(cfg.data, self.tokenizer, **limits)
        self.data = InstructionDataset(cfg.data)
        pt_kind = self.objective.pretraining_kind
        if pt_kind:
            check_dataset_matches(cfg.pt_data, self.tokenizer)
        self.pt_data = PretrainDataset(cfg.pt_data, cfg.training.max_length + 1) if pt_kind else None
        checksums = cfg.checkpoint.checksums
        student, self.arch, self.meta = load_model(
            cfg.student, dtype=cfg.training.dtype, checksums=checksums, sequence_parallel=cfg.parallel.sequence_parallel
        )
        if cfg.training.recompute:
            student.config.recompute_granularity, student.config.recompute_method = "full", "uniform"
            student.config.recompute_num_layers = 1
        self.teacher = None
        if cfg.teacher:
            check_tokenizers_compatible(
                load_tokenizer(cfg.teacher),
                self.tokenizer,
                read_metadata(cfg.teacher).padded_vocab_size,
                self.meta.padded_vocab_size,
                cfg.parallel.tp,
            )
            teacher_tp, teacher_pp = cfg.parallel.teacher_layout
            self.teacher = Teacher.load(
                cfg.teacher,
                layout=ParallelLayout(tp=teacher_tp, pp=teacher_pp, world_size=self.layout.world_size),
                student_layout=self.layout,
                dtype=cfg.training.dtype,
                cache_dtype=cfg.training.teacher_cache_dtype,
                vocab_size=self.arch.vocab_size,
                checksums=checksums,
            )
        opt = cfg.optimizer
        self.model, self.optimizer, self.scheduler = setup_model_and_optimizer(
            student,
            OptimizerConfig(
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=cfg.training.dtype == "bf16",
                use_distributed_optimizer=opt.use_distributed_optimizer,
            ),
            train_iters=cfg.training.train_iters * self.steps_per_iteration,
            lr_warmup_iters=opt.lr_warmup_iters,
            lr_decay_style=opt.lr_decay_style,
        )
        self.timers = Timers()
        self.sample_stats: dict[str, float] = {}
        self.own_samples: list[Tensor] = []  # the last on-policy iteration's responses (guardrails)
        guarded = cfg.guardrails.enabled and self.teacher is not None
        self.guardrails = Guardrails(cfg.guardrails) if guarded else None
        self.guardrail_interval = cfg.guardrails.interval or (1 if self.on_policy else OFF_POLICY_CHECK_INTERVAL)
        self.probe: list[MicroBatch] = []  # built at the first check
        self.probe_length = 0.0  # the teacher's mean response length on the probe prompts
        self.preemption = PreemptionFlag()

    # ----------------------------------------------------------------------------------------------
    # batches

    @property
    def on_policy(self) -> bool:
        return self.objective.samples == "student"

    def _check_batches(self) -> None:
        t, per_step = self.cfg.training, self.cfg.training.micro_batch_size * self.layout.dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size "
                f"x DP = {t.micro_batch_size} x {self.layout.dp}"
            )
        if self.on_policy and self.cfg.rollout.batch_size % t.global_batch_size:
            raise ConfigError(
                f"rollout.batch_size {self.cfg.rollout.batch_size} must be a multiple of "
                f"training.global_batch_size {t.global_batch_size}"
            )

    @property
    def steps_per_iteration(self) -> int:
        if not self.on_policy:
            return 1
        return self.objective.epochs * self.cfg.rollout.batch_size // self.cfg.training.global_batch_size

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
            indices.append(int(torch.randperm(n, generator=gen, device="cpu")[k % n]))  # host: a data index
        return ids, indices

    def _examples(self, indices: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Prompts (cut to max_prompt_length) and responses of dataset examples."""
        pairs = [self.data[i] for i in indices]
        limit = self.cfg.training.max_prompt_length
        return [torch.from_numpy(p[:limit]) for p, _ in pairs], [torch.from_numpy(r) for _, r in pairs]

    def _pack(
        self,
        kind: BatchKind,
        prompts: list[Tensor],
        responses: list[Tensor],
        micro_batch_size: int | None = None,
        **per_token,
    ) -> list[MicroBatch]:
        """Micro-batches of ``kind`` (of ``training.micro_batch_size`` unless given); one optimizer
        step's share their [mbs, s] (see ``sequence_length``)."""
        t = self.cfg.training
        seq = sequence_length(
            [len(p) + len(y) for p, y in zip(prompts, responses)],
            t.max_length,
            fixed=self.layout.pp > 1,
            multiple=math.lcm(8, self.layout.tp) if self.cfg.parallel.sequence_parallel else 8,
        )
        return pack(
            prompts,
            responses,
            kind=kind.name,
            micro_batch_size=micro_batch_size or t.micro_batch_size,
            seq_length=seq,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
            **per_token,
        )

    def _pretrain_batches(self, kind: BatchKind, step: int, count: int) -> list[MicroBatch]:
        """``count`` micro-batches of pretraining text for optimizer step ``step``: chunks (of
        max_length + 1 tokens) with global ids [step G, (step + 1) G), this rank's contiguous share,
        as the rollouts; the loss covers every position."""
        t = self.cfg.training
        first = step * t.global_batch_size + self.dp_rank * (t.global_batch_size // self.dp)
        chunks = [
            torch.from_numpy(self.pt_data[(first + r) % len(self.pt_data)]) for r in range(count * t.micro_batch_size)
        ]
        return pack(
            [c[:1] for c in chunks],
            [c[1:] for c in chunks],
            kind=kind.name,
            micro_batch_size=t.micro_batch_size,
            seq_length=t.max_length,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
            logits_at_responses=False,
        )

    def _score(self, kind: BatchKind, batches: list[MicroBatch]) -> None:
        """The teacher's outputs that ``kind``'s loss reads (:meth:`Teacher.score`), if any."""
        if kind.needs_teacher:
            self.teacher.score(kind, batches)

    def _teacher_logits_dtype(self) -> torch.dtype | None:
        """The dtype speculative rollouts keep the teacher's logits in; None: they keep none."""
        reuse = self.cfg.rollout.reuse_teacher_logits and self.objective.main_kind.needs_teacher
        return DTYPES[self.cfg.training.teacher_cache_dtype] if reuse else None

    def _teacher_from_rollouts(self, kind: BatchKind, batches: list[MicroBatch], rollouts: list[Rollout]) -> None:
        """What :meth:`_score` would compute, taken from speculative rollouts (last stage): the
        logits at each response position in the layout of the loss, and log p of each token."""
        if not self.is_last_stage:
            return
        per_sample = [
            (r.teacher_logits[i, :n], r.teacher_log_p[i, :n])
            for r in rollouts
            for i, n in enumerate(r.mask.sum(1).tolist())  # host-side: the row lengths, to slice with
        ]
        for batch in batches:
            rows, per_sample = per_sample[: len(batch.tokens)], per_sample[len(batch.tokens) :]
            counts = batch.loss_mask.sum(1).long().tolist()  # host-side: each row's response length
            set_teacher_outputs(
                batch,
                [logits[:n] for (logits, _), n in zip(rows, counts)] if kind.teacher_logits else None,
                [lp[:n] for (_, lp), n in zip(rows, counts)] if kind.teacher_log_p else None,
            )
        for rollout in rollouts:  # copied into the micro-batches: [b, T, V/TP] each, not kept for training
            rollout.teacher_logits = None

    def _train_step(self, batches: list[MicroBatch], iteration: int) -> list[dict]:
        token_normalize(batches, self.dp, self.dp_group)
        metrics, _ = train_step(
            self.model, self.optimizer, self.scheduler, batches, self.objective.loss, where=f"iteration {iteration + 1}"
        )
        return metrics

    # ----------------------------------------------------------------------------------------------
    # one iteration

    def _rollouts(self, iteration: int) -> tuple[list[Tensor], list[Rollout]]:
        cfg = self.cfg
        ids, indices = self._sample_ids(iteration, cfg.rollout.batch_size)
        prompts, _ = self._examples(indices)
        max_new = cfg.training.max_length - cfg.training.max_prompt_length
        params = cfg.rollout.sampling_params(max_new, (self.tokenizer.eos_id,))
        rollouts = []
        chunks = range(0, len(prompts), cfg.rollout.micro_batch_size)
        for start in tqdm(
            chunks,
            desc=f"rollouts of iteration {iteration + 1}",
            leave=False,
            disable=dist.get_rank() != 0 or len(chunks) < 2,
        ):
            chunk = slice(start, start + cfg.rollout.micro_batch_size)
            seeds = sample_seeds(cfg.seed + 7919 * (iteration + 1), torch.tensor(ids[chunk], device=self.device))
            teacher = self.teacher.sampler if params.mix_alpha else None
            rollouts.append(
                generate(
                    self.model,
                    prompts[chunk],
                    params,
                    seeds,
                    vocab_size=self.arch.vocab_size,
                    teacher=teacher,
                    pad_id=self.tokenizer.pad_id,
                    teacher_logits_dtype=self._teacher_logits_dtype(),
                )
            )
        return prompts, rollouts

    def _on_policy_iteration(self, iteration: int) -> list[dict]:
        cfg, objective = self.cfg, self.objective
        kind, pt_kind = objective.main_kind, objective.pretraining_kind
        start = time.perf_counter()
        prompts, rollouts = self._rollouts(iteration)
        responses, log_q_old, weights = [], [], []
        for rollout in rollouts:
            tokens, log_q, w = response_tensors(rollout)
            responses, log_q_old, weights = responses + tokens, log_q_old + log_q, weights + w
        self.timers.add("rollout", start)

        # Optimizer step k takes the rollouts with global ids [k G, (k + 1) G): this rank's share of
        # them is a contiguous slice, so the steps are the same sets of samples at any DP size.
        start = time.perf_counter()
        local = cfg.training.global_batch_size // self.dp
        steps = [
            self._pack(
                kind,
                prompts[i : i + local],
                responses[i : i + local],
                log_q_old=log_q_old[i : i + local],
                importance_weight=weights[i : i + local],
            )
            for i in range(0, len(prompts), local)
        ]
        samples = [b for step in steps for b in step]
        if self._teacher_logits_dtype() and rollouts[0].speculation:  # the teacher scored every position
            self._teacher_from_rollouts(kind, samples, rollouts)
        else:
            self._score(kind, samples)
        if self.is_last_stage:
            objective.prepare_samples(samples)
        self.sample_stats = self._sample_stats(samples, responses) | self._speculation_stats(rollouts)
        self.own_samples = responses
        self.timers.add("score", start)

        # Each epoch visits the steps in a new order (LMOps reshuffles the buffer; keeping the sets
        # is what makes DP layouts agree).
        start = time.perf_counter()
        metrics = []
        for epoch in range(objective.epochs):
            gen = torch.Generator().manual_seed(cfg.seed + 104729 * iteration + epoch)
            for k in torch.randperm(len(steps), generator=gen, device="cpu").tolist():  # host: an order
                micro = [b.replace() for b in steps[k]]
                if self.is_last_stage:
                    objective.prepare_step(micro, self.dp_group)
                if pt_kind is not None:
                    pt = self._pretrain_batches(pt_kind, int(self.scheduler.num_steps), len(micro))
                    self._score(pt_kind, pt)
                    micro = [m for pair in zip(micro, pt) for m in pair]
                metrics += self._train_step(micro, iteration)
        self.timers.add("train", start)
        return metrics

    def _off_policy_iteration(self, iteration: int) -> list[dict]:
        cfg, kind = self.cfg, self.objective.main_kind
        start = time.perf_counter()
        _, indices = self._sample_ids(iteration, cfg.training.global_batch_size)
        prompts, responses = self._examples(indices)
        if self.objective.samples == "teacher":
            responses = self._teacher_samples(prompts, indices)
        self.timers.add("rollout", start)
        start = time.perf_counter()
        batches = self._pack(kind, prompts, responses)
        self._score(kind, batches)
        self.timers.add("score", start)
        start = time.perf_counter()
        metrics = self._train_step(batches, iteration)
        self.timers.add("train", start)
        self.sample_stats = {"response length": sum(map(len, responses)) / max(len(responses), 1)}
        return metrics

    def _teacher_samples(self, prompts: list[Tensor], indices: list[int]) -> list[Tensor]:
        """The teacher's responses to dataset examples ``indices``, drawn with the rollout warpers;
        a sample's seed is its example's, so an example always gets the same response."""
        cfg = self.cfg
        max_new = cfg.training.max_length - cfg.training.max_prompt_length
        params = cfg.rollout.sampling_params(max_new, (self.tokenizer.eos_id,), mix=False)
        model, teacher = self.teacher.model, None
        if self.teacher.own_layout:  # p~ = p at alpha = 1: the teacher's tokens, in the student's layout
            params = dataclasses.replace(params, mix_alpha=1.0, speculative_k=0)
            model, teacher = self.model, self.teacher.sampler
        rollout = generate(
            model,
            prompts,
            params,
            sample_seeds(cfg.seed, torch.tensor(indices, device=self.device)),
            vocab_size=self.arch.vocab_size,
            teacher=teacher,
            pad_id=self.tokenizer.pad_id,
        )
        return response_tensors(rollout)[0]

    def _sample_stats(self, batches: list[MicroBatch], responses: list[Tensor]) -> dict[str, float]:
        """The objective's statistics of the samples as token means over all DP ranks, and the mean
        response length."""
        sums = self.objective.sample_stats(batches) if self.is_last_stage else {}
        tokens = sum(b.loss_mask.sum() for b in batches) if self.is_last_stage else 0.0
        stats = torch.tensor(
            [*map(float, sums.values()), float(tokens), float(sum(map(len, responses))), float(len(responses))],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(stats, group=self.dp_group)
        *values, tokens, length, count = stats.tolist()
        out = {name: value / max(tokens, 1.0) for name, value in zip(sums, values)}
        out["response length"] = length / max(count, 1.0)
        return out

    def _speculation_stats(self, rollouts: list[Rollout]) -> dict[str, float]:
        """Speculative sampling's draft acceptance rate and tokens per teacher forward over all DP
        ranks; nothing when the rollouts were sampled token by token."""
        if not rollouts or rollouts[0].speculation is None:
            return {}
        names = [f.name for f in fields(SpeculationStats)]
        counts = [sum(getattr(r.speculation, name) for r in rollouts) for name in names]
        totals = torch.tensor(counts, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals, group=self.dp_group)
        stats = SpeculationStats(**dict(zip(names, totals.tolist())))
        return {
            "draft acceptance": stats.acceptance_rate,
            "tokens per teacher forward": stats.tokens_per_teacher_forward,
        }

    def iteration(self, iteration: int) -> dict[str, float]:
        """Run one iteration; return its metrics averaged over micro-batches and DP ranks (last stage)."""
        run = self._on_policy_iteration if self.on_policy else self._off_policy_iteration
        metrics = run(iteration)
        names = sorted({k for m in metrics for k in m})
        # Each micro-batch carries its share of the step's token mean: the mean over micro-batches
        # (and DP ranks) is the token mean of the step, averaged over the iteration's steps.
        values = torch.tensor(
            [sum(float(m.get(k, 0.0)) for m in metrics) / max(len(metrics), 1) for k in names],
            dtype=torch.float64,
            device=self.device,
        )
        if self.is_last_stage and names:
            dist.all_reduce(values, group=self.dp_group)
            values /= self.dp
        out = dict(zip(names, values.tolist()))
        out.update(self.sample_stats)
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    # ----------------------------------------------------------------------------------------------
    # the run

    def run(self) -> dict[str, float]:
        """Train from the latest checkpoint in ``checkpoint.save`` (if any) to ``train_iters``; return
        the last metrics."""
        cfg, save = self.cfg, self.cfg.checkpoint.save
        start_iteration = self._resume()
        writer = self._tensorboard()
        metrics: dict[str, float] = {}
        last_log = time.perf_counter()
        train_iters = cfg.training.train_iters
        for iteration in range(start_iteration, train_iters):
            metrics = self.iteration(iteration)
            if self.guardrails and (iteration + 1) % self.guardrail_interval == 0:
                metrics.update(self._guardrail_check(iteration + 1, metrics))
            if (iteration + 1) % cfg.logging.log_interval == 0 or iteration + 1 == train_iters:
                elapsed = time.perf_counter() - last_log
                self._log(iteration + 1, metrics, elapsed, writer)
                last_log, self.timers = time.perf_counter(), Timers()
            final = iteration + 1 == train_iters
            stop = self.preemption.should_stop()  # collective: every rank, every iteration
            interval = cfg.checkpoint.save_interval
            if save and (final or stop or (interval and (iteration + 1) % interval == 0)):
                self._save(iteration + 1)
            if stop and not final:
                log.info("SIGTERM: stopping after iteration %d%s", iteration + 1, " (saved)" if save else "")
                break
        return metrics

    # ----------------------------------------------------------------------------------------------
    # collapse guardrails (guardrails.py)

    def _build_probe(self) -> None:
        """The teacher's samples of the first ``probe_samples`` training prompts (rounded up to a
        multiple of DP), split over the DP ranks, one micro-batch per rank; their mean length."""
        n = math.ceil(self.cfg.guardrails.probe_samples / self.dp) * self.dp
        indices = [i % len(self.data) for i in range(self.dp_rank, n, self.dp)]
        prompts, _ = self._examples(indices)
        responses = self._teacher_samples(prompts, indices)
        self.probe = self._pack(PROBE, prompts, responses, micro_batch_size=len(prompts))
        length = torch.tensor([float(sum(map(len, responses)))], dtype=torch.float64, device=self.device)
        dist.all_reduce(length, group=self.dp_group)
        self.probe_length = length.item() / n

    def _probe_rkl(self) -> tuple[float, float]:
        """(sum of the student's per-token reverse KL on the probe, its tokens) on this DP rank's
        share (last stage; zeros elsewhere): the teacher scores the probe afresh (nothing kept between
        checks), the student runs forward only, in eval mode."""
        probe = [b.replace() for b in self.probe]
        self._score(PROBE, probe)
        self.model.eval()
        sums = forward_outputs(
            self.model,
            probe,
            lambda b, z: reverse_kl(z, b.teacher_logits, vocab_size=self.arch.vocab_size, reduction="sum"),
        )
        self.model.train()
        return float(sum(sums)), float(sum(b.loss_mask.sum() for b in probe)) if sums else 0.0

    def _guardrail_check(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """One check (collective): the guardrails' numbers, logged with the iteration's; warnings, or
        :class:`CollapseError` with ``guardrails.stop``. The last rank's numbers (last stage,
        summed over its DP group) are broadcast, so every rank takes the same decision."""
        cfg, start = self.cfg.guardrails, time.perf_counter()
        if not self.probe:
            self._build_probe()
        rkl, tokens = self._probe_rkl()
        grams, counted = distinct_n([r.tolist() for r in self.own_samples], cfg.distinct_n)  # host: token ids
        sums = torch.tensor([rkl, tokens, grams, counted], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums, group=self.dp_group)
        own_rkl = torch.tensor([metrics.get(OWN_RKL, math.nan)], dtype=torch.float64, device=self.device)
        numbers = torch.cat([sums, own_rkl])
        dist.broadcast(numbers, src=dist.get_world_size() - 1)
        rkl, tokens, grams, counted, own_rkl = numbers.tolist()
        check = Check(iteration, probe_rkl=rkl / max(tokens, 1.0))
        out = {PROBE_RKL: check.probe_rkl}
        if self.on_policy:  # the student's own samples of this iteration (their mean length: _sample_stats')
            check.own_rkl = None if math.isnan(own_rkl) else own_rkl
            check.distinct = grams / max(counted, 1.0)
            check.length_ratio = metrics["response length"] / max(self.probe_length, 1e-9)
            out |= {f"distinct-{cfg.distinct_n}": check.distinct, LENGTH_RATIO: check.length_ratio}
        warnings = self.guardrails.update(check)
        if dist.get_rank() == dist.get_world_size() - 1:
            for warning in warnings:
                log.warning("guardrails, iteration %d: %s", iteration, warning)
        self.timers.add("guardrails", start)
        if warnings and cfg.stop:
            raise CollapseError(
                f"iteration {iteration}: {'; '.join(warnings)}. Stopped without saving (guardrails.stop=true); "
                "resume from the last checkpoint with a lower learning rate, or set guardrails.stop=false"
            )
        return out

    def _resume(self) -> int:
        """The iteration to start from: that of the latest checkpoint in ``checkpoint.save``, else 0."""
        save = self.cfg.checkpoint.save
        if not save:
            return 0
        found = load_training_checkpoint(
            save, self.model, self.optimizer, self.scheduler, self.arch, checksums=self.cfg.checkpoint.checksums
        )
        if found is None:
            return 0
        iteration, state = found
        if self.guardrails and "guardrails" in state:
            self.guardrails.load_state_dict(state["guardrails"])
        log.info("resumed from %s at iteration %d", save, iteration)
        return iteration

    def _save(self, iteration: int) -> None:
        """Model, optimizer, scheduler, RNG states and the resolved config; the data position is
        the iteration itself (see :meth:`_sample_ids`)."""
        state = {"iteration": iteration, "config": self.cfg.to_dict()}
        if self.guardrails:
            state["guardrails"] = self.guardrails.state_dict()
        save_training_checkpoint(
            self.cfg.checkpoint.save,
            iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            metadata=self.meta,
            hf_dir=self.cfg.student,
            checksums=self.cfg.checkpoint.checksums,
        )

    def _log(self, iteration: int, metrics: dict[str, float], elapsed: float, writer) -> None:
        if dist.get_rank() != dist.get_world_size() - 1:  # the last rank holds the last stage's metrics
            return
        cfg, shares = self.cfg, self.timers.seconds
        total = sum(shares.values()) or 1.0
        samples = cfg.rollout.batch_size if self.on_policy else cfg.training.global_batch_size
        tokens_per_s = metrics.get("response length", 0.0) * samples * cfg.logging.log_interval / max(elapsed, 1e-9)
        parts = [f"iteration {iteration:6d}/{cfg.training.train_iters}", f"lr {metrics['lr']:.3e}"]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k != "lr"]
        names = ("rollout", "score", "train", "guardrails")
        phases = "/".join(f"{100 * shares.get(k, 0.0) / total:.0f}" for k in names)
        parts.append(f"{'/'.join(names)} {phases} %")
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
        if not self.cfg.logging.tensorboard_dir or dist.get_rank() != dist.get_world_size() - 1:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.cfg.logging.tensorboard_dir)

    @staticmethod
    def _peak_memory_gb() -> float:
        if is_cuda():
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
