"""Graph-aware checks of the losses that need more than an output and a target (issue #5):
GAN alternating steps, DQN's TD loss with a frozen target network, BERT's masked-LM loss,
triplet and contrastive losses; and which parameters DistributedDataParallel must expect
to get no gradient (`find_unused_parameters`).

`lbdlc.training.check` calls these for the loss kinds in `KINDS`; the code they plan is
written by backends/train_losses.py. Errors point at the YAML line, as everywhere in `train:`.
"""
from __future__ import annotations

import fnmatch

from ..errors import SpecError, did_you_mean

KINDS = ("gan", "td", "masked_lm", "triplet", "contrastive")
TARGETLESS = ("gan", "td", "triplet")  # their data holds no target keyed by the output


def _output(c, names: list[str], ref: str, path, key: str, what: str) -> int:
    if ref not in names:
        layer = any(n.name == ref for n in c.graph.nodes)
        raise SpecError(f"{what}: '{ref}' is not an output of the model", c.at(*path, key),
                        hint=(f"list it under `outputs:` (now {', '.join(names)})" if layer
                              else did_you_mean(ref, names) or f"outputs: {', '.join(names)}"))
    return names.index(ref)


def gan_plan(c, loss, path, inputs, outputs):
    """The LossPlan of a `gan` loss: its fake/real logit outputs, noise input and players."""
    from .check import LossPlan

    names = [o.name for o in outputs]
    if loss.output is not None:
        raise SpecError("a gan loss reads `fake` and `real` (the discriminator's logits); `output` is not used",
                        c.key_at(*path, "output"), hint="remove `output:`")
    fake = _output(c, names, loss.fake, path, "fake", "gan")
    real = _output(c, names, loss.real, path, "real", "gan")
    for key, k in (("fake", fake), ("real", real)):
        o = outputs[k]
        if not o.is_float or len(o.shape) != 2 or o.shape[1] != 1:
            raise SpecError(f"gan: '{o.name}' should be the discriminator's logits [batch, 1]; it is {o.shape_text()} {o.dtype}",
                            c.at(*path, key))
    if fake == real:
        raise SpecError("gan: `fake` and `real` name the same output", c.at(*path, "real"))
    noise = next((i for i in inputs if i.name == loss.noise), None)
    if noise is None or not noise.is_float:
        floats = [i.name for i in inputs if i.is_float]
        raise SpecError(f"gan: '{loss.noise}' is not a float input of the model", c.at(*path, "noise"),
                        hint=did_you_mean(loss.noise, floats) or f"float inputs: {', '.join(floats) or 'none'}")
    if any(not isinstance(d, int) for d in noise.shape[1:]):
        raise SpecError(f"gan: the noise input '{noise.name}' {noise.shape_text()} needs fixed sizes after the batch dimension",
                        c.at(*path, "noise"))
    if len(inputs) < 2:
        raise SpecError("gan: the model needs an input for real samples besides the noise", c.at(*path, "noise"))
    if len(c.train.loss_list()) > 1:
        raise SpecError("a gan loss trains with its own alternating steps; it cannot be part of a weighted sum",
                        c.at(*path, "kind"), hint="write it as the only loss: `loss: {kind: gan, ...}`")
    if c.train.grad_accumulation > 1 or c.train.precision == "fp16":
        key = "grad_accumulation" if c.train.grad_accumulation > 1 else "precision"
        raise SpecError(f"gan training does not support {key} {getattr(c.train, key)!r} yet", c.at(key),
                        hint="use one batch per step, in fp32 or bf16")
    params = [p for p, d in c.graph.params.items() if not d.buffer]
    players = {}
    for role in ("generator", "discriminator"):
        chosen = set()
        for k, pat in enumerate(getattr(loss, role)):
            hits = [p for p in params if fnmatch.fnmatchcase(p, pat)]
            if not hits:
                raise SpecError(f"gan: the {role} pattern '{pat}' matches no parameter", c.at(*path, role, k)
                                if c.has(*path, role) else c.at(*path, "kind"),
                                hint="patterns are fnmatch patterns over parameter names (`lbdlc check --json` lists them)")
            chosen.update(hits)
        players[role] = chosen
    both = sorted(players["generator"] & players["discriminator"])
    if both:
        raise SpecError(f"gan: parameter '{both[0]}' belongs to both the generator and the discriminator",
                        c.at(*path, "discriminator") if c.has(*path, "discriminator") else c.at(*path, "kind"))
    neither = [p for p in params if p not in players["generator"] | players["discriminator"]]
    if neither:
        raise SpecError(f"gan: parameter '{neither[0]}' belongs to neither the generator nor the discriminator"
                        + (f" (and {len(neither) - 1} more)" if len(neither) > 1 else ""), c.at(*path, "kind"),
                        hint="name the players' parameters with `generator: [...]` and `discriminator: [...]` patterns")
    extra = {"fake": fake, "real": real, "noise": {noise.name: list(noise.shape[1:])}}
    return LossPlan(loss, loss.fake, fake, None, extra=extra, line=c.at(*path).line)


def check(c, loss, o, inputs, outputs, path) -> dict:
    """td, masked_lm, triplet, contrastive: the outputs and inputs they read, as LossPlan.extra."""
    names = [x.name for x in outputs]
    where = c.at(*path, "kind")
    if loss.kind == "td":
        if len(o.shape) != 2 or not isinstance(o.shape[1], int):
            raise SpecError(f"td reads action values [batch, actions]; '{o.name}' has shape {o.shape_text()}", where)
        floats = [i for i in inputs if i.is_float]
        if len(inputs) != 1 or not floats:
            raise SpecError("td feeds the next states through the model: it needs exactly one float input (the state); the model has "
                            + ", ".join(f"{i.name} {i.shape_text()} {i.dtype}" for i in inputs), where)
        if len(c.train.loss_list()) > 1:
            raise SpecError("a td loss cannot be part of a weighted sum yet", where, hint="write it as the only loss")
        if c.train.data.kind != "npz":
            raise SpecError(f"td learns from transitions in an .npz file; the data is '{c.train.data.kind}'", c.at("data", "kind"),
                            hint="use `data: {kind: npz, path: replay.npz}` with arrays state, action, reward, next_state, done")
        return {"state": inputs[0].name}
    if loss.kind == "masked_lm":
        if len(o.shape) != 3:
            raise SpecError(f"masked_lm reads logits [batch, seq, vocab]; '{o.name}' has shape {o.shape_text()}", where)
        ints = [i for i in inputs if not i.is_float]
        if loss.tokens is not None:
            tok = next((i for i in ints if i.name == loss.tokens), None)
            if tok is None:
                raise SpecError(f"'{loss.tokens}' is not an integer input of the model", c.at(*path, "tokens"),
                                hint=did_you_mean(loss.tokens, [i.name for i in ints]) or
                                (f"integer inputs: {', '.join(i.name for i in ints)}" if ints else "the model has no integer input"))
        elif len(ints) != 1:
            raise SpecError("masked_lm masks the model's token input; " + (
                "the model has no integer input" if not ints else f"say which: `tokens: <input>` ({', '.join(i.name for i in ints)})"), where)
        else:
            tok = ints[0]
        if len(tok.shape) != 2:
            raise SpecError(f"masked_lm needs token ids [batch, seq]; '{tok.name}' has shape {tok.shape_text()}", where)
        vocab = o.shape[-1]
        mask_id = loss.mask_id if loss.mask_id is not None else vocab - 1
        if mask_id >= vocab:
            raise SpecError(f"mask_id {mask_id} is not a class of '{o.name}' ({vocab} logits)", c.at(*path, "mask_id"),
                            hint=f"ids run from 0 to {vocab - 1}")
        return {"tokens": tok.name, "mask_id": mask_id, "vocab": vocab}
    # triplet, contrastive: embeddings [batch, dim] of the same shape
    refs = ("positive", "negative") if loss.kind == "triplet" else ("other",)
    if len(o.shape) != 2:
        raise SpecError(f"{loss.kind} reads embeddings [batch, dim]; '{o.name}' has shape {o.shape_text()}", where)
    extra = {}
    for key in refs:
        k = _output(c, names, getattr(loss, key), path, key, loss.kind)
        if outputs[k].shape != o.shape:
            raise SpecError(f"{loss.kind}: '{outputs[k].name}' {outputs[k].shape_text()} and '{o.name}' {o.shape_text()} differ in shape",
                            c.at(*path, key))
        extra[key] = k
    return extra


def target_of(lp, o):
    """The target a special loss needs in the data (keyed by its output), or None for the usual rule."""
    from .check import Tensor

    if lp.spec.kind == "contrastive":
        return Tensor(o.name, o.shape[:1], "float32")  # 1: similar pair, 0: dissimilar
    return None


def data_inputs(losses, inputs):
    """The inputs the data feeds: all but the GAN's noise."""
    noise = {n for lp in losses if lp.spec.kind == "gan" for n in lp.extra["noise"]}
    return [i for i in inputs if i.name not in noise]


def check_data(c, losses, inputs=None, outputs=None, targets=None) -> None:
    """Data sources that a special loss needs; the image folder against the model."""
    d = c.train.data
    if d.kind == "image_folder":
        _check_image_folder(c, inputs, outputs, targets, losses)
    for k, lp in enumerate(losses):
        path = ("loss",) if c.train.loss is not None else ("losses", k)
        if lp.spec.kind == "masked_lm" and d.kind != "text":
            raise SpecError(f"masked_lm masks token windows of text; the data is '{d.kind}'", c.at("data", "kind"),
                            hint="use `data: {kind: text, path: ..., seq_len: N}`")
        if lp.spec.kind == "masked_lm" and d.kind == "text" and d.tokenizer == "byte" and lp.extra["mask_id"] < 256:
            raise SpecError(f"the byte tokenizer gives ids 0-255, so the mask id {lp.extra['mask_id']} would be a byte",
                            c.at(*path, "mask_id") if c.has(*path, "mask_id") else c.at(*path, "kind"),
                            hint="a vocabulary of at least 257 (mask id 256 or above), or `tokenizer: char`")
        if lp.spec.kind == "contrastive" and d.kind not in ("npz", "npy", "synthetic"):
            raise SpecError(f"contrastive needs a 0/1 similarity per pair; the '{d.kind}' data has none", c.at("data", "kind"),
                            hint="use npz or npy data with a target array for the output")


def unused_parameters(graph, losses) -> list[str]:
    """Trainable parameters from which no loss output can be reached: DDP must be told
    (`find_unused_parameters=True`), or it waits for their gradients forever."""
    read = set()
    for lp in losses:
        read.add(lp.index)
        read.update(v for k, v in lp.extra.items() if k in ("mu", "logvar", "fake", "real", "positive", "negative", "other"))
    producers = graph.producers()
    seen, stack, used = set(), [graph.outputs[k] for k in read], set()
    while stack:
        v = stack.pop()
        node = producers.get(id(v))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        used.update(node.params.values())
        stack.extend(node.inputs)
    return [p for p, d in graph.params.items() if not d.buffer and p not in used]


def find_unused(c, graph, losses) -> bool:
    t = c.train
    unused = unused_parameters(graph, losses)
    if t.find_unused_parameters is False and unused:
        raise SpecError(f"find_unused_parameters is false, but no loss depends on parameter '{unused[0]}'"
                        + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""),
                        c.at("find_unused_parameters"),
                        hint="under torchrun, DistributedDataParallel would wait for its gradient forever: remove the option")
    return bool(unused) if t.find_unused_parameters is None else t.find_unused_parameters



def _check_image_folder(c, inputs, outputs, targets, losses) -> None:
    d = c.train.data
    kind_at = c.at("data", "kind")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SpecError("image_folder data is read with Pillow, which is not installed", kind_at,
                        hint="pip install pillow (train.py needs it too)") from None
    image = inputs[0] if len(inputs) == 1 else None
    if image is None or not image.is_float or len(image.shape) != 4:
        raise SpecError("image_folder data feeds one float image input [batch, channels, height, width]; the model has "
                        + ", ".join(f"{i.name} {i.shape_text()} {i.dtype}" for i in inputs), kind_at)
    if not all(isinstance(x, int) for x in image.shape[1:]) or image.shape[1] not in (1, 3):
        raise SpecError(f"image_folder converts images to grey (1 channel) or RGB (3) at a fixed size; input '{image.name}' is "
                        f"{image.shape_text()}", kind_at)
    target = d.target or (losses[0].output if losses and targets else None)
    if target is not None and target not in targets:
        raise SpecError(f"the image folder's labels need a loss on '{target}' with class targets (cross_entropy or nll)",
                        c.at("data", "target") if d.target else kind_at, hint=f"outputs with targets: {', '.join(targets) or 'none'}")
    t = targets.get(target) if target else None
    if t is not None and t.dtype != "int64":
        raise SpecError(f"the image folder gives class ids; '{target}' is trained on values", kind_at)
    folder = c.train_folder / d.path if hasattr(c, "train_folder") else None
    o = next((o for o in outputs if o.name == target), None)
    if folder is not None and folder.is_dir() and o is not None and isinstance(o.shape[-1], int):
        classes = [x.name for x in folder.iterdir() if x.is_dir()]
        if len(classes) > o.shape[-1]:
            raise SpecError(f"{d.path} has {len(classes)} class folders, but '{o.name}' scores {o.shape[-1]} classes",
                            c.at("data", "path"))
