"""pymoe: run Mixture-of-Experts GGUF models larger than the GPU, token by token,
over llama.cpp."""
from ._native import ffi as _ffi, lib as _lib, show_log
from .errors import (AbortedError, BackendError, BusyError, ClosedError, ContextFullError, InvalidArgumentError,
                     InvalidStateError, ModelFormatError, ModelNotFoundError, OutOfMemoryError, PymoeError,
                     PymoeWarning, StaleLogitsError, TokenOutOfVocabularyError, UnsupportedError)
from .decoder import Decoder
from . import expert_cache
from .expert_cache import MoeCacheInfo, MoeCacheStats
from .logits import LogitsView
from .memory import (LoadReport, MemoryFacts, MemoryPlan, Placement, judge_memory, memory_facts, memory_plan,
                     place_tensors)
from .model import Model, ModelInfo
from .plan import Plan, parse_size, plan
from .routing import RoutingReport, routing_report
from .sampling import Rng, SamplingParams
from .session import Session, Token
from .speculative import LookupStats, NgramDraft, Speculative, SpecStats, verify, verify_sparse
from .text import TextStream

__version__ = _ffi.string(_lib.pymoe_version()).decode()


def build_info() -> str:
    """One line: the backends compiled in (a GPU backend without a usable GPU says why) and the devices found."""
    buf = _ffi.new("char[]", 1024)
    _lib.pymoe_build_info(buf, len(buf))
    return _ffi.string(buf).decode("utf-8", "replace")


def llama_version() -> str:
    """The version of the llama.cpp libpymoe was built with."""
    return _ffi.string(_lib.pymoe_llama_version()).decode()


__all__ = [
    "Model", "ModelInfo", "Session", "Speculative", "NgramDraft", "LookupStats", "Decoder", "SpecStats", "verify",
    "verify_sparse",
    "SamplingParams", "Rng", "Token",
    "MoeCacheInfo", "MoeCacheStats", "expert_cache",
    "TextStream", "LogitsView", "show_log", "llama_version", "build_info", "routing_report", "RoutingReport",
    "plan", "Plan", "parse_size", "memory_plan", "memory_facts", "place_tensors", "judge_memory", "MemoryPlan", "MemoryFacts", "Placement", "LoadReport",
    "PymoeError", "InvalidArgumentError", "ModelNotFoundError", "ModelFormatError", "OutOfMemoryError",
    "TokenOutOfVocabularyError", "ContextFullError", "InvalidStateError", "StaleLogitsError", "ClosedError",
    "BusyError", "AbortedError", "BackendError", "UnsupportedError", "PymoeWarning",
]
