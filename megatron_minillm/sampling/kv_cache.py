"""One model's incremental decoding with a KV cache, through its pipeline stage.

megatron-core's ``StaticInferenceContext`` holds the cache; this class adds what batched sampling
needs on top: left padding (an attention mask hides pad positions, position ids count only real
tokens), hidden states passed stage to stage, and vocab-parallel logits on the last stage (with an
inference context GPTModel always gathers the vocabulary, so the last stage runs the output layer
itself on this rank's slice).
"""

import torch
from megatron.core import parallel_state
from megatron.core.inference import communication_utils as comm
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
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
        self.context = StaticInferenceContext(batch_size, max_length)
        self.is_first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.dtype = next(self.model.parameters()).dtype
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool)  # cache positions that hold real tokens

    def forward(self, tokens: Tensor, position_ids: Tensor, valid: Tensor) -> Tensor | None:
        """Append ``tokens`` [b, s] (``valid`` [b, s]: False at padding) to the cache."""
        batch, new = tokens.shape
        self.valid = torch.cat((self.valid, valid), dim=1)
        keys = self.valid.shape[1]
        causal = torch.ones(new, keys, dtype=torch.bool).tril(keys - new)
        masked = ~(causal[None, None] & self.valid[:, None, None, :])  # [b, 1, s, k], True = hidden
        if not self.is_first:
            hidden = torch.empty(new, batch, self.model.config.hidden_size, dtype=self.dtype)
            comm.recv_from_prev_pipeline_rank_(hidden)
            self.model.set_input_tensor(hidden)
        with decoder_output_only(self.model):
            out = self.model(tokens, position_ids, masked, inference_context=self.context, runtime_gather_output=True)
        self.context.sequence_len_offset += new
        if not self.is_last:
            comm.send_to_next_pipeline_rank(out.contiguous())
            return None
        return output_logits(self.model, out[-1:])[0]
