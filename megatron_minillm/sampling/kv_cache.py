"""One model's incremental decoding with a KV cache, through its pipeline stage.

megatron-core's ``StaticInferenceContext`` holds the cache; this class adds what batched sampling
needs on top: left padding (an attention mask hides pad positions, position ids count only real
tokens), hidden states passed stage to stage, and vocab-parallel logits on the last stage (with an
inference context GPTModel always gathers the vocabulary, so the last stage runs the output layer
itself on this rank's slice). A student built with sequence parallelism decodes without it
(``models.logits.sequence_parallel_off``): one new token per sequence cannot be split over TP ranks.

Process groups come from the model, not from arguments: megatron-core's GPTModel keeps the
``pg_collection`` it was built with (megatron's global groups when it was built without one), so a
model built on its own TP x PP layout decodes over that layout with nothing more to pass, and a
decoder can never pair a model with another layout's groups.
"""

import torch
import torch.distributed as dist
from megatron.core.inference import communication_utils as comm
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
from megatron.core.utils import unwrap_model
from torch import Tensor

from megatron_minillm.models.logits import decoder_output_only, output_logits, sequence_parallel_off


class KVCacheDecoder:
    """Prefill a left-padded batch, then feed one token per sequence per step.

    Every pipeline stage calls :meth:`forward` with the same tokens; the last stage gets the
    vocab-parallel logits [b, V/TP] of each sequence's newest position, the others ``None``.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int) -> None:
        self.model: GPTModel = unwrap_model(model)
        self.tp_group: dist.ProcessGroup = self.model.pg_collection.tp  # splits the logits' vocabulary
        self.pp_group: dist.ProcessGroup = self.model.pg_collection.pp  # carries hidden states stage to stage
        self.context = StaticInferenceContext(batch_size, max_length)
        self.is_first = is_pp_first_stage(self.pp_group)
        self.is_last = is_pp_last_stage(self.pp_group)
        first_param = next(self.model.parameters())
        self.dtype, self.device = first_param.dtype, first_param.device
        # Cache positions that hold real tokens [b, k].
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)

    def forward(
        self, tokens: Tensor, position_ids: Tensor, valid: Tensor, every_position: bool = False
    ) -> Tensor | None:
        """Append ``tokens`` [b, s] (``valid`` [b, s]: False at padding) to the cache; the logits of
        the newest position [b, V/TP], or of every new position [b, s, V/TP] (``every_position``)."""
        batch, new = tokens.shape
        if self.context.sequence_len_offset + new > self.context.max_sequence_length:
            self.compact()
        self.valid = torch.cat((self.valid, valid), dim=1)
        keys = self.valid.shape[1]
        causal = torch.ones(new, keys, dtype=torch.bool, device=self.device).tril(keys - new)
        masked = ~(causal[None, None] & self.valid[:, None, None, :])  # [b, 1, s, k], True = hidden
        if not self.is_first:
            hidden = torch.empty(new, batch, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
            comm.recv_from_prev_pipeline_rank_(hidden, pp_group=self.pp_group)
            self.model.set_input_tensor(hidden)
        with sequence_parallel_off(self.model), decoder_output_only(self.model):
            out = self.model(tokens, position_ids, masked, inference_context=self.context, runtime_gather_output=True)
        self.context.sequence_len_offset += new
        if not self.is_last:
            comm.send_to_next_pipeline_rank(out.contiguous(), pp_group=self.pp_group)
            return None
        if every_position:
            return output_logits(self.model, out).transpose(0, 1)  # [s, b, V/TP] -> [b, s, V/TP]
        return output_logits(self.model, out[-1:])[0]

    def drop(self, keep: Tensor) -> None:
        """Remove the newest ``keep.shape[1]`` cache positions where ``keep`` [b, n] is False (drafts
        the verifier rejected), by :meth:`compact`."""
        self.valid[:, -keep.shape[1] :] &= keep
        if not bool(keep.all()):
            self.compact()

    def compact(self) -> None:
        """Move each row's visible positions to the end of the cache, in order, hidden ones before
        them (as left padding), and shorten the cache to the longest row.

        megatron's static cache keeps keys unrotated and rotates them by cache slot at every forward:
        a row's visible keys must be contiguous and end at the newest slot, or rotary attention would
        see hidden positions in the distances. The same on every stage (same ``valid``).
        """
        counts = self.valid.sum(1)
        length = int(counts.max())
        # Hidden positions first, visible ones last and in order: a stable sort of "visible".
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, -length:]  # [b, length]
        for key, value in self.context.key_value_memory_dict.values():  # [max_len, b, heads, dim] each
            index = order.t()[:, :, None, None].expand(-1, -1, *key.shape[2:])
            for memory in (key, value):
                memory[:length] = memory.gather(0, index)
        self.valid = torch.arange(length, device=self.device)[None, :] >= (length - counts)[:, None]
        self.context.sequence_len_offset = length
