"""One model's incremental decoding with a KV cache, through its pipeline stage.

megatron-core's ``StaticInferenceContext`` holds the cache; this class adds what batched sampling
needs on top: left padding (an attention mask hides pad positions, position ids count only real
tokens), hidden states passed stage to stage, and vocab-parallel logits on the last stage (with an
inference context GPTModel always gathers the vocabulary, so the last stage runs the output layer
itself on this rank's slice).

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

from megatron_minillm.models.logits import decoder_output_only, output_logits


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

    def forward(self, tokens: Tensor, position_ids: Tensor, valid: Tensor) -> Tensor | None:
        """Append ``tokens`` [b, s] (``valid`` [b, s]: False at padding) to the cache."""
        batch, new = tokens.shape
        self.valid = torch.cat((self.valid, valid), dim=1)
        keys = self.valid.shape[1]
        causal = torch.ones(new, keys, dtype=torch.bool, device=self.device).tril(keys - new)
        masked = ~(causal[None, None] & self.valid[:, None, None, :])  # [b, 1, s, k], True = hidden
        if not self.is_first:
            hidden = torch.empty(new, batch, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
            comm.recv_from_prev_pipeline_rank_(hidden, pp_group=self.pp_group)
            self.model.set_input_tensor(hidden)
        with decoder_output_only(self.model):
            out = self.model(tokens, position_ids, masked, inference_context=self.context, runtime_gather_output=True)
        self.context.sequence_len_offset += new
        if not self.is_last:
            comm.send_to_next_pipeline_rank(out.contiguous(), pp_group=self.pp_group)
            return None
        return output_logits(self.model, out[-1:])[0]
