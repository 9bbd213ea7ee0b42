"""Refinement of dense class scores guided by the image (PAMR, DenseCRF)."""

from itaclip_core.refinement.crf import dense_crf
from itaclip_core.refinement.pamr import PAMR, pamr, pamr_affinity, propagate

__all__ = ["PAMR", "dense_crf", "pamr", "pamr_affinity", "propagate"]
