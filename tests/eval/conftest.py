"""A model that copies: the test double that must find every needle.

`CopyModel` predicts, at the last position, the token that followed the longest earlier match of
the text's suffix (an idealized induction head). It has the HF interface the evaluation uses:
`forward(input_ids, past_key_values, use_cache, logits_to_keep)` returning `.logits` and
`.past_key_values`, where the "cache" is the token history itself.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn


class CopyModel(nn.Module):
    def __init__(self, vocab_size: int, copies: bool = True):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, model_type="copy")
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.copies = copies

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0, **kwargs):
        history = torch.cat([past_key_values, input_ids[0]]) if past_key_values is not None else input_ids[0]
        T, V = input_ids.shape[1], self.config.vocab_size
        logits = torch.zeros(1, T, V)
        logits[0, -1, self.next_token(history) if self.copies else 0] = 1.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=history)

    @staticmethod
    def next_token(seq: torch.Tensor) -> int:
        """The token after the most recent longest earlier match of the suffix of `seq`."""
        T = seq.numel()
        cand = (seq[:-1] == seq[-1]).nonzero()[:, 0]  # j < T−1 with seq[j] == seq[T−1]
        if cand.numel() == 0:
            return 0
        m = 1
        while True:
            ok = cand[cand - m >= 0]
            ok = ok[seq[ok - m] == seq[T - 1 - m]] if T - 1 - m >= 0 else ok[:0]
            if ok.numel() == 0:
                break
            cand, m = ok, m + 1
        return int(seq[cand.max() + 1])


@pytest.fixture
def copy_model():
    return CopyModel

