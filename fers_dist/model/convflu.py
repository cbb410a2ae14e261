"""ConvFLU: the convolutional feature leaky unit that shares features selectively between the FER and
FES branches (paper Sec. III-B, eq. 1-4).

For flow from task y into task x (all convolutions 1x1, pad 0):

    r   = sigma(leaky_gate([F_x, F_y]))          eq. 1, leaky gate
    F~  = tanh(W(r * F_y) + U(F_x))              eq. 2, candidate
    z   = sigma(memory_gate([F_x, F_y]))         eq. 3, memory gate
    F_x' = (1 - z) * F_x + z * F~                eq. 4, output

r and z are returned so they can be visualised (paper Fig. 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv1x1(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=1, padding=0, bias=bias)


class ConvFLU(nn.Module):
    """One direction of feature flow, y -> x, for feature maps of ``channels`` channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.leaky_gate = conv1x1(2 * channels, channels)  # W_r, eq. 1
        self.memory_gate = conv1x1(2 * channels, channels)  # W_z, eq. 3 (its bias opens/closes the unit)
        self.W = conv1x1(channels, channels)  # eq. 2, applied to r * F_y
        self.U = conv1x1(channels, channels, bias=False)  # eq. 2, applied to F_x (W carries the one bias)

    def forward(self, f_x: Tensor, f_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        both = torch.cat([f_x, f_y], dim=1)
        r = torch.sigmoid(self.leaky_gate(both))  # eq. 1
        candidate = torch.tanh(self.W(r * f_y) + self.U(f_x))  # eq. 2
        z = torch.sigmoid(self.memory_gate(both))  # eq. 3
        out = (1 - z) * f_x + z * candidate  # eq. 4
        return out, r, z
