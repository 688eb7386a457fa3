r"""Differentiable Neural Computer (Graves et al., Nature 2016), written from the paper's
Methods; the sizes and the output clipping are those of DeepMind's ``dnc`` code, which
the AliG authors trained on the repeat-copy task (seeds.md §6).

One step ``t`` with input :math:`x_t` and the previous read vectors
:math:`r_{t-1} = [r^1; \dots; r^R]`:

1. controller: :math:`h_t, c_t = \text{LSTM}([x_t; r_{t-1}], (h_{t-1}, c_{t-1}))`, both
   clipped to :math:`[-\text{clip}, \text{clip}]`;
2. interface :math:`\xi_t = W_\xi h_t + b_\xi`, split into read keys :math:`k^r`, read
   strengths :math:`\beta^r = \text{oneplus}(\cdot)`, write key :math:`k^w`, write
   strength, erase :math:`e = \sigma(\cdot)`, write vector :math:`v`, free gates
   :math:`f = \sigma(\cdot)`, allocation and write gates :math:`\sigma(\cdot)` and read modes
   :math:`\pi = \text{softmax}(\cdot)` over (backward, content, forward);
3. write: usage, allocation, write weighting, memory, link and precedence
   (:mod:`bilevel.models.dnc_addressing`);
4. read: :math:`w^r = \pi_1 b + \pi_2 C(M_t, k^r, \beta^r) + \pi_3 f`, :math:`r = M_t^\top w^r`;
5. output :math:`y_t = W_y [h_t; r_t] + b_y`, clipped.

:math:`\text{oneplus}(x) = 1 + \log(1 + e^x)`, as in the paper (DeepMind's code applies a
plain softplus to the strengths, so theirs may fall below 1). One write head. The LSTM is one linear map
of ``[input; h]`` to the four gates with a single bias and +1 on the forget gate (as
Sonnet's); weights start truncated-normal with std ``1/sqrt(fan_in)``, biases at 0.

Parameter count for the AliG sizes (input 6, output 5, 64 LSTM units, 16 slots of 16,
4 read heads): 34,560 (LSTM) + 8,775 (interface, 135 outputs) + 645 (output) = 43,980.

Shapes: ``forward(inputs [T, B, input_size])`` -> ``logits [T, B, output_size]``; the state
starts at zero for every sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.models import dnc_addressing as addr


class DNCState(NamedTuple):
    """Recurrent state, batched."""

    h: Tensor  # [B, hidden]
    c: Tensor  # [B, hidden]
    reads: Tensor  # [B, R, W] read vectors
    memory: Tensor  # [B, N, W]
    read_weights: Tensor  # [B, R, N]
    write_weights: Tensor  # [B, N]
    usage: Tensor  # [B, N]
    link: Tensor  # [B, N, N]
    precedence: Tensor  # [B, N]


def _init_linear(layer: nn.Linear) -> nn.Linear:
    std = layer.in_features ** -0.5
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


class DNC(nn.Module):
    """LSTM controller + external memory with content, allocation and temporal-link
    addressing (one write head, ``num_reads`` read heads).

    Args:
        input_size: features of ``x_t`` (6 for 4-bit repeat-copy).
        output_size: logits per step (5 for 4-bit repeat-copy).
        hidden_size: LSTM units (64).
        memory_size: slots ``N`` (16).
        word_size: slot width ``W`` (16).
        num_reads: read heads ``R`` (4).
        clip_value: controller state and output are clipped to ``[-clip, clip]`` (20, as
            the authors' runs); ``None`` turns clipping off.
    """

    def __init__(self, input_size: int, output_size: int, *, hidden_size: int = 64,
                 memory_size: int = 16, word_size: int = 16, num_reads: int = 4,
                 clip_value: float | None = 20.0) -> None:
        super().__init__()
        self.hidden_size, self.memory_size = hidden_size, memory_size
        self.word_size, self.num_reads, self.clip_value = word_size, num_reads, clip_value
        R, W = num_reads, word_size
        # Interface layout: read keys, read strengths, write key, write strength, erase,
        # write vector, free gates, allocation gate, write gate, read modes.
        self._split = [R * W, R, W, 1, W, W, R, 1, 1, 3 * R]
        self.controller = _init_linear(nn.Linear(input_size + R * W + hidden_size,
                                                 4 * hidden_size))
        self.interface = _init_linear(nn.Linear(hidden_size, sum(self._split)))
        self.output = _init_linear(nn.Linear(hidden_size + R * W, output_size))

    def initial_state(self, batch_size: int, *, like: Tensor) -> DNCState:
        """All zeros, on ``like``'s device and dtype."""
        B, N, W, R, H = batch_size, self.memory_size, self.word_size, self.num_reads, \
            self.hidden_size
        z = like.new_zeros
        return DNCState(z(B, H), z(B, H), z(B, R, W), z(B, N, W), z(B, R, N), z(B, N),
                        z(B, N), z(B, N, N), z(B, N))

    def _clip(self, x: Tensor) -> Tensor:
        c = self.clip_value
        return x if c is None else x.clamp(-c, c)

    def step(self, x: Tensor, s: DNCState) -> DNCState:
        """One time step of the core: ``x [B, input_size]`` -> the new state (its ``h`` and
        ``reads`` are what :meth:`readout` turns into logits)."""
        B, R, W = x.shape[0], self.num_reads, self.word_size
        gates = self.controller(torch.cat([x, s.reads.reshape(B, R * W), s.h], dim=-1))
        i, g, f, o = gates.chunk(4, dim=-1)
        c = self._clip(torch.sigmoid(f + 1.0) * s.c + torch.sigmoid(i) * torch.tanh(g))
        h = self._clip(torch.sigmoid(o) * torch.tanh(c))

        parts = self.interface(h).split(self._split, dim=-1)
        read_keys = parts[0].reshape(B, R, W)
        read_strengths = 1 + F.softplus(parts[1])
        write_key, write_strength = parts[2], 1 + F.softplus(parts[3][:, 0])
        erase, values = torch.sigmoid(parts[4]), parts[5]
        free_gates = torch.sigmoid(parts[6])
        alloc_gate, write_gate = torch.sigmoid(parts[7][:, 0]), torch.sigmoid(parts[8][:, 0])
        modes = torch.softmax(parts[9].reshape(B, R, 3), dim=-1)  # backward, content, forward

        usage = addr.update_usage(s.usage, s.write_weights, free_gates, s.read_weights)
        allocation = addr.allocation_weighting(usage)
        write_w = addr.write_weighting(s.memory, write_key, write_strength, allocation,
                                       alloc_gate, write_gate)
        memory = addr.write_memory(s.memory, write_w, erase, values)
        link = addr.update_link(s.link, s.precedence, write_w)
        precedence = addr.update_precedence(s.precedence, write_w)

        forward, backward = addr.directional_weightings(link, s.read_weights)
        content = addr.content_weighting(memory, read_keys, read_strengths)
        read_w = (modes[..., 0:1] * backward + modes[..., 1:2] * content
                  + modes[..., 2:3] * forward)
        reads = read_w @ memory  # [B, R, W]

        return DNCState(h, c, reads, memory, read_w, write_w, usage, link, precedence)

    def readout(self, h: Tensor, reads: Tensor) -> Tensor:
        """Clipped logits ``W_y [h; r] + b_y`` from ``h [..., hidden]``, ``reads [..., R, W]``."""
        return self._clip(self.output(torch.cat([h, reads.flatten(-2)], dim=-1)))

    def forward(self, inputs: Tensor) -> Tensor:
        """Run over a time-major sequence ``[T, B, input_size]`` from the zero state."""
        state = self.initial_state(inputs.shape[1], like=inputs)
        hs, reads = [], []
        for x in inputs.unbind(0):
            state = self.step(x, state)
            hs.append(state.h)
            reads.append(state.reads)
        # The readout feeds nothing back, so it runs once over all steps (fewer small ops).
        return self.readout(torch.stack(hs), torch.stack(reads))
