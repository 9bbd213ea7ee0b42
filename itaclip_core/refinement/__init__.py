"""Refinement of dense class scores guided by the image (PAMR)."""

from itaclip_core.refinement.pamr import PAMR, pamr, pamr_affinity, propagate

__all__ = ["PAMR", "pamr", "pamr_affinity", "propagate"]
