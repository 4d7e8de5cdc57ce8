"""rtkern: runtime, fused sampler and trainer for language models with refusal tokens.

    spec = rtkern.RefusalSpec.from_tokenizer(tok, scheme="category")
    controls = rtkern.RefusalControls.build(B, spec.num_categories, "cuda", thresholds=0.3)
    out = rtkern.refusal_sample(logits, spec, controls)   # tokens, refusal_probs, refused

    model, tok = rtkern.load_model("path/to/checkpoint", device="cuda")
    [r] = rtkern.Engine(model, tok).generate(["..."], rtkern.SamplingParams(thresholds=0.3))
"""
from pathlib import Path as _Path

# In a source checkout kernels/, train/ and bench/ sit beside rtkern/ (setup.py maps them to
# rtkern.*); let `python -m rtkern.cli` work from the checkout even before `pip install -e .`.
if (_Path(__file__).resolve().parent.parent / "kernels" / "refusal_sampler.py").is_file():
    __path__.append(str(_Path(__file__).resolve().parent.parent))

from .engine import Engine, GenerationResult, SamplingParams
from .loader import load_model
from .sampler import apply_refusal_, refusal_probs, refusal_sample
from .spec import (CATEGORIES, MODES, RefusalControls, RefusalSpec, SampleOutput, pack_vocab_mask,
                   unpack_vocab_mask)

__all__ = ["load_model", "Engine", "SamplingParams", "GenerationResult", "RefusalSpec", "RefusalControls", "SampleOutput", "refusal_sample", "refusal_probs",
           "apply_refusal_", "pack_vocab_mask", "unpack_vocab_mask", "CATEGORIES", "MODES"]
__version__ = "0.1.0"
