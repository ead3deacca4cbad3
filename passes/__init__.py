"""Graph -> graph transforms over the lbdlc IR (installed as `lbdlc.passes`).

- manager.py: `Pass`, `PassManager` (verification and the pass log), the registry `PASSES`;
- pattern.py: pattern rewriting (`P`, `Rewrite`, `rewrite`), the tool the passes are written with;
- canonicalize.py, fold.py, fusion.py: the passes;
- pipeline.py: optimization levels -O0..-O3 and how a build chooses its passes.
"""
from . import canonicalize, fold, fusion  # noqa: F401  (register the passes)
from . import quantize  # noqa: F401  (the quantize pass; lbdlc/ops/quant.py's linear_q)
from . import lora  # noqa: F401  (the lora and lora_merge passes; lbdlc/ops/lora.py's lora_linear)
from . import decompose_attention  # noqa: F401  (attention -> linear projections + SDPA, and back)
from . import recognize  # noqa: F401  (recognize_layer_norm; gelu rules of recognize_activations)
from .manager import PASSES, Pass, PassContext, PassManager, PassRecord, check_graph  # noqa: F401
from .pipeline import DEFAULT_LEVEL, LEVELS, Pipeline, choose  # noqa: F401
