"""train.py's fine-tuning code, for a spec with `finetune:` (lbdlc/finetune.py).

`patch(text, plan)` adds to a generated train.py (backends/train_script.py):
- TRAINABLE, LORA_LAYERS and LORA_CONFIG (the PEFT adapter_config.json), spelled out;
- `freeze_for_finetune(model, rank)`, called right after the model is built and loaded:
  requires_grad only for TRAINABLE (the optimizer takes only those), and a line
  "trainable parameters: N of M (F%)";
- `save_adapter(model, out)`, called where run/weights.safetensors is written: the adapters in
  PEFT's layout beside it, adapter_config.json and adapter_model.safetensors with keys
  `base_model.model.<layer>.lora_A.weight` / `.lora_B.weight`.
Without `finetune:` (plan.finetune is None) the text is returned unchanged.
"""
from __future__ import annotations

import pprint

from .train_script import DEFINE_BEFORE, MODEL_READY, WEIGHTS_SAVED, insert


def _config(plan) -> dict:
    from lbdlc.adapters import AdapterConfig

    ft = plan.finetune
    causal = any(getattr(lp.spec, "kind", None) == "next_token" for lp in plan.losses)
    cfg = AdapterConfig(ft.r, ft.alpha, ft.dropout, tuple(sorted(ft.adapters)), ft.rslora,
                        "CAUSAL_LM" if causal else None, ft.base)
    return cfg.to_json()


def code(plan) -> str:
    ft = plan.finetune
    where = f"{plan.spec_file}:{ft.spec_line}" if ft.spec_line else plan.spec_file
    config = pprint.pformat(_config(plan), sort_dicts=False, width=100)
    trainable = "".join(f"    {name!r},\n" for name in ft.trainable)
    layers = "".join(f"    {name!r},\n" for name in sorted(ft.adapters))
    return f'''\
# Fine-tuning ({where}, `finetune:`): only these parameters train; the rest keep the base
# weights the build loaded. LoRA's A and B are saved in PEFT's layout (save_adapter).
TRAINABLE = [
{trainable}]
LORA_LAYERS = [
{layers}]
LORA_CONFIG = {config}
QUANTIZED_VALUES = {ft.quantized_values:_}  # QLoRA: base weight values held as quantized buffers (frozen)


def freeze_for_finetune(model: nn.Module, rank: int = 0) -> tuple[int, int]:
    """requires_grad only for TRAINABLE; prints trainable vs total parameters."""
    params = dict(model.named_parameters())
    missing = sorted(set(TRAINABLE) - set(params))
    if missing:
        sys.exit(f"error: model.py has no parameter {{missing[0]}}; rebuild it with lbdlc build")
    for name, p in params.items():
        p.requires_grad_(name in TRAINABLE)
    n_train = sum(p.numel() for name, p in params.items() if name in TRAINABLE)
    total = sum(p.numel() for p in params.values()) + QUANTIZED_VALUES
    if rank == 0:
        print(f"trainable parameters: {{n_train:,}} of {{total:,}} ({{100 * n_train / total:.2f}}%)", flush=True)
    return n_train, total


def save_adapter(model: nn.Module, out: Path) -> None:
    """adapter_config.json and adapter_model.safetensors beside weights.safetensors: PEFT's
    layout (peft.PeftModel.from_pretrained on a model with the spec's module names reads them,
    and so does `lbdlc build SPEC --adapter DIR`)."""
    state = model.state_dict()
    tensors = {{f"base_model.model.{{layer}}.{{part}}.weight": state[f"{{layer}}.{{part}}.weight"].detach().float().cpu().contiguous()
               for layer in LORA_LAYERS for part in ("lora_A", "lora_B")}}
    (out / "adapter_config.json").write_text(json.dumps(LORA_CONFIG, indent=2) + "\\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={{"format": "pt"}})
'''


def patch(text: str, plan) -> str:
    if getattr(plan, "finetune", None) is None:
        return text
    return insert(text, "train_lora", [
        (DEFINE_BEFORE, "before", code(plan) + "\n\n"),
        (MODEL_READY, "after", "    freeze_for_finetune(raw_model, rank)  # `finetune:`: only TRAINABLE trains\n"),
        (WEIGHTS_SAVED, "after", "        save_adapter(raw_model, out)  # the LoRA adapters, PEFT's layout\n"),
    ])
