"""The sub-classifier attached after each layer but the last."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig


class ExitClassifier(nn.Module):
    """Pooler-like sub-classifier on the first (CLS) token: ``Linear(d, w) -> tanh -> Linear(w, labels)``.

    FastBERT's sub-classifier adds a two-head self-attention over all tokens. We use the first token only
    because (1) token pruning removes tokens from the packed batch, and a head that needs every token would
    either see a different set at each layer or force us to keep them; (2) the head then costs
    ``d*w + w*labels`` MACs per example whatever the length (negligible next to a layer), while FastBERT's
    grows with the length and needs its own attention launch per layer; (3) CLS already aggregates the
    sequence through the backbone's attention, and the main classifier reads the same token, so
    self-distillation from it is well posed (DeeBERT's highway classifiers do the same).

    Input ``(batch, hidden)``, output ``(batch, labels)``, in the input dtype.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        width = config.exit_hidden_size
        self.dense = nn.Linear(config.hidden_size, width)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(width, config.num_labels)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.dense(first_token))))
