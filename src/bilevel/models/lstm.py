"""Two-layer LSTM language model (Clarke et al.'s Penn Treebank model).

Source: ``rmclarke/OptimisingWeightUpdateHyperparameters`` ``models.py`` (after the PyTorch
``word_language_model`` example): embedding 650, 2-layer LSTM with 650 units, linear decoder
to the 10,000-word vocabulary, no dropout (the seed disables it), untied weights; inputs are
time-major ``[T, n]`` as produced by :func:`bilevel.data.batchify`. Embedding and decoder
weights start uniform in ``[-0.1, 0.1]``, the decoder bias at 0.

Parameter count: 19,780,400 for the seed's sizes (vocab 10,000, 650/650, 2 layers).
Double backward through an LSTM needs the non-cuDNN kernel on GPUs
(``torch.backends.cudnn.flags(enabled=False)``); on CPU it just works.
"""

from __future__ import annotations

import torch
from torch import nn

Hidden = tuple[torch.Tensor, torch.Tensor]


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> Linear, returning logits and the new hidden state.

    Args:
        vocab_size: number of tokens.
        embedding_dim: embedding width (650).
        hidden_size: LSTM units per layer (650).
        num_layers: stacked LSTM layers (2).
        dropout: dropout between layers and on embeddings/outputs (0, as the seed).

    Shapes:
        ``forward(tokens [T, n], hidden)`` -> ``(logits [T, n, vocab_size], (h, c))`` with
        ``h, c`` of shape ``[num_layers, n, hidden_size]``; ``hidden=None`` starts from zeros.
    """

    def __init__(self, vocab_size: int = 10_000, *, embedding_dim: int = 650, hidden_size: int = 650,
                 num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        emb = self.drop(self.embedding(tokens))  # [T, n, E]
        out, hidden = self.lstm(emb, hidden)  # [T, n, H]
        return self.decoder(self.drop(out)), hidden

    @staticmethod
    def detach_hidden(hidden: Hidden) -> Hidden:
        """Cut the graph between truncated-BPTT segments."""
        return hidden[0].detach(), hidden[1].detach()
