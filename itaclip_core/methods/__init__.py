"""Dense readouts ("dense methods"): the stage that turns windows into patch logits (see `base`), and the presets
of the method zoo (`presets`)."""

from itaclip_core.methods.base import (
    DENSE_READOUTS,
    DenseReadout,
    TokensReadout,
    get_readout,
    readout_class,
    register_readout,
)

__all__ = ["DENSE_READOUTS", "DenseReadout", "TokensReadout", "get_readout", "readout_class", "register_readout"]
