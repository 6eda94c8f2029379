"""Weight initialization: one ``variance_scaling_`` core, gains picked from the activation that follows."""

from ._core import (
    Distribution,
    Mode,
    fans,
    kaiming_normal_,
    kaiming_uniform_,
    lecun_normal_,
    lecun_uniform_,
    normal_,
    ones_,
    orthogonal_,
    trunc_normal_,
    variance_scaling_,
    xavier_normal_,
    xavier_uniform_,
    zeros_,
)
from ._gain import KNOWN_NONLINEARITIES, calculate_gain, second_moment_gain
from ._initialize import SCHEMES, InitReport, find_activations, initialize
from ._lsuv import lsuv_

__all__ = [
    "KNOWN_NONLINEARITIES",
    "SCHEMES",
    "Distribution",
    "InitReport",
    "Mode",
    "calculate_gain",
    "fans",
    "find_activations",
    "initialize",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lecun_uniform_",
    "lsuv_",
    "normal_",
    "ones_",
    "orthogonal_",
    "second_moment_gain",
    "trunc_normal_",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]
