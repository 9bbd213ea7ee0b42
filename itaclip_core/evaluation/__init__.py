"""The resumable, distributed benchmark runner and its reports."""

from itaclip_core.evaluation.distributed import DistContext, init_distributed
from itaclip_core.evaluation.records import ImageRecord, ResumeError
from itaclip_core.evaluation.runner import EvalOptions, evaluate

__all__ = ["DistContext", "EvalOptions", "ImageRecord", "ResumeError", "evaluate", "init_distributed"]
