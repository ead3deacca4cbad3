"""train.py code for the losses that need more than `loss_fn(outputs, batch)` (issue #5):

- `gan`: alternating discriminator/generator updates (its own forward, train_step, evaluate);
- `td`: DQN's TD loss against a frozen target network, synchronised every TARGET_SYNC steps;
- `masked_lm`: BERT's 80/10/10 masking (fresh per training batch, fixed for validation/test);
- `triplet`, `contrastive`: metric-learning losses over embedding outputs.

backends/train_script.py calls these at a few marked places ("hooks"); each returns ""
(or None) for a spec that does not use them, so other specs' train.py is unchanged.
The checks that come before are in lbdlc/training/special.py.
"""
from __future__ import annotations

KINDS = ("gan", "td", "masked_lm", "triplet", "contrastive")


def _num(x) -> str:
    from .train_script import _num as num

    return num(x)


def _losses(w, kind: str) -> list:
    return [lp for lp in w.p.losses if lp.spec.kind == kind]


def _gan(w):
    found = _losses(w, "gan")
    return found[0] if found else None


def _td(w):
    found = _losses(w, "td")
    return found[0] if found else None


def _mlm(w):
    found = _losses(w, "masked_lm")
    return found[0] if found else None


def _loss_line(w, lp) -> str:
    return w.at("loss") if w.t.loss is not None else f"{w.file}:{lp.line}"


def _var(name: str) -> str:
    return name.replace(".", "_")


def needs_fnmatch(w) -> bool:
    return _gan(w) is not None


# -- loss expressions (for loss_fn) -------------------------------------------------------


def loss_expr(w, lp) -> tuple[str, str]:
    """(expression, description) of one loss term of loss_fn, as train_script._loss_expr."""
    s = lp.spec
    o = f"outputs[{lp.index}]"
    if s.kind == "td":
        return f"td_loss({o}, batch)", f"TD error of {lp.output} against the frozen target network"
    if s.kind == "masked_lm":
        return (f'F.cross_entropy({o}.flatten(0, -2), batch["{lp.target}"].flatten(), ignore_index=-100)',
                f"masked-LM cross-entropy of {lp.output} at the masked positions of {lp.tokens} (labels -100 elsewhere)")
    if s.kind == "triplet":
        kw = [f"margin={_num(s.margin)}"]
        if s.p != 2:
            kw.append(f"p={_num(s.p)}")
        if s.swap:
            kw.append("swap=True")
        pos, neg = lp.extra["positive"], lp.extra["negative"]
        return (f"F.triplet_margin_loss({o}, outputs[{pos}], outputs[{neg}], {', '.join(kw)})",
                f"triplet margin loss: anchors {lp.output}, positives {s.positive}, negatives {s.negative}")
    if s.kind == "contrastive":
        return (f'contrastive_loss({o}, outputs[{lp.extra["other"]}], batch["{lp.target}"], margin={_num(s.margin)})',
                f"contrastive loss of the pairs ({lp.output}, {s.other}); target 1 = similar")
    raise ValueError(s.kind)


# -- helpers emitted before loss_fn ---------------------------------------------------------


def support(w) -> str:
    """Constants and functions the special losses need, placed before forward/loss_fn."""
    parts = []
    td = _td(w)
    if td is not None:
        s = td.spec
        error = (f"F.huber_loss(q, y, delta={_num(s.delta)})" if s.error == "huber" else "F.mse_loss(q, y)")
        where = _loss_line(w, td)
        call = "target_network(batch[\"next_state\"])" + (f"[{td.index}]" if len(w.p.outputs) > 1 else "")
        parts.append(f'''\
GAMMA = {_num(s.gamma)}  # discount, {w.at(*_path(w, td), "gamma") if _has(w, td, "gamma") else where}
TARGET_SYNC = {s.target_sync}  # optimizer steps between copies of the online weights into the target network, {w.at(*_path(w, td), "target_sync") if _has(w, td, "target_sync") else where}
target_network: nn.Module | None = None  # the frozen copy Q(s, a; w-bar); written by sync_target only


def sync_target(model: nn.Module) -> None:
    """Copy the online network's weights into the frozen target network ({where}): at the start,
    then every TARGET_SYNC optimizer steps. Between copies the target network does not change."""
    global target_network
    if target_network is None:
        target_network = Model().to(next(model.parameters()).device).requires_grad_(False).eval()
    target_network.load_state_dict(model.state_dict())


def td_loss(q_values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """DQN's TD loss ({where}): Q(s, a) of the actions taken against
    y = r + GAMMA * (1 - done) * max_a' Q(s', a'; w-bar), {"Huber (delta " + _num(s.delta) + ")" if s.error == "huber" else "squared error"}."""
    q = q_values.gather(1, batch["action"].unsqueeze(1)).squeeze(1)  # Q(s, a; w)
    with torch.no_grad():  # y is a constant: no gradient flows into the target network
        next_q = {call}.amax(1)  # max over a' of Q(s', a'; w-bar)
    y = batch["reward"] + GAMMA * (1 - batch["done"]) * next_q
    return {error}''')
    mlm = _mlm(w)
    if mlm is not None:
        s = mlm.spec
        vocab, mask_id = mlm.extra["vocab"], mlm.extra["mask_id"]
        high = mask_id if mask_id == vocab - 1 else vocab
        where = _loss_line(w, mlm)
        parts.append(f'''\
MASK_PROB = {_num(s.mask_prob)}  # positions chosen for the masked-LM loss, {w.at(*_path(w, mlm), "mask_prob") if _has(w, mlm, "mask_prob") else where}
MASK_ID = {mask_id}  # the [MASK] token{" (the vocabulary's last id, reserved)" if mask_id == vocab - 1 else ""}, {w.at(*_path(w, mlm), "mask_id") if _has(w, mlm, "mask_id") else where}
RANDOM_IDS = {high}  # replacement tokens are drawn from [0, RANDOM_IDS)


def mask_tokens(tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking ({where}): each position is chosen with probability MASK_PROB; a chosen
    token becomes MASK_ID 80% of the time, a random token 10%, and stays as it is 10%.
    Returns (masked tokens, labels): labels hold the original id at chosen positions, -100 elsewhere."""
    chosen = torch.rand(tokens.shape, generator=generator, device=tokens.device) < MASK_PROB
    labels = torch.where(chosen, tokens, -100)  # the loss reads the chosen positions only
    action = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    random_ids = torch.randint(0, RANDOM_IDS, tokens.shape, generator=generator, device=tokens.device)
    masked = torch.where(chosen & (action < 0.8), MASK_ID, tokens)  # 80%: [MASK]
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)  # 10%: a random token
    return masked, labels  # (the other 10% of chosen positions keep their token)


def mask_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training batch with a fresh mask (dynamic masking: every batch is masked anew)."""
    tokens, labels = mask_tokens(batch["{mlm.tokens}"])
    return {{**batch, "{mlm.tokens}": tokens, "{mlm.target}": labels}}''')
    if _losses(w, "contrastive"):
        parts.append('''\
def contrastive_loss(x1: torch.Tensor, x2: torch.Tensor, similar: torch.Tensor, margin: float) -> torch.Tensor:
    """Contrastive loss of embedding pairs (Hadsell, Chopra & LeCun 2006): with d = |x1 - x2|,
    similar pairs (1) pay d^2 / 2, dissimilar ones (0) max(0, margin - d)^2 / 2; mean over pairs."""
    d = F.pairwise_distance(x1, x2)
    return (0.5 * similar * d.pow(2) + 0.5 * (1 - similar) * F.relu(margin - d).pow(2)).mean()''')
    return "\n\n\n".join(parts)


def _path(w, lp) -> tuple:
    if w.t.loss is not None:
        return ("loss",)
    return ("losses", w.p.losses.index(lp))


def _has(w, lp, key) -> bool:
    return w.p.line(*_path(w, lp), key) is not None


# -- hooks in make_data and the training loop ---------------------------------------------


def npz_arrays(w) -> list[str]:
    """Extra entries of make_data's `arrays` for an .npz file (td: the transitions)."""
    td = _td(w)
    if td is None:
        return []
    t = td.spec.transitions
    return [f'"action": torch.from_numpy(files["{t.action}"]).long()',
            f'"reward": torch.from_numpy(files["{t.reward}"]).float()',
            f'"next_state": torch.from_numpy(files["{t.next_state}"]).float()',
            f'"done": torch.from_numpy(files["{t.done}"]).float()']  # 1.0 where the episode ended


def sample_shapes(w) -> dict:
    """Extra SAMPLE_SHAPES entries (td: the transitions; the next state is shaped like the state)."""
    td = _td(w)
    if td is None:
        return {}
    state = next(i for i in w.p.inputs if i.name == td.extra["state"])
    return {"action": [], "reward": [], "next_state": [x if isinstance(x, int) else None for x in state.shape[1:]], "done": []}


def text_masks(w) -> str:
    """Lines at the end of the text make_data (masked_lm: fixed masks for validation and test)."""
    mlm = _mlm(w)
    if mlm is None:
        return ""
    check = ""
    if w.t.data.tokenizer == "char":
        check = '''
    if len(chars) > MASK_ID:
        sys.exit(f"error: {path} has {len(chars)} distinct characters; ids from MASK_ID = {MASK_ID} on are reserved")'''
    return f'''{check}
    # masked_lm: validation and test windows are masked once, with a fixed seed, so that their
    # loss compares across evaluations; training batches get a fresh mask each (mask_batch).
    g = torch.Generator().manual_seed(SPLIT_SEED)
    for name in ("val", "test"):
        splits[name]["{mlm.tokens}"], splits[name]["{mlm.target}"] = mask_tokens(splits[name]["{mlm.tokens}"], g)
'''


def batch_hook(w) -> str:
    """A line after a training batch is cut (and augmented)."""
    if _mlm(w) is not None:
        return "\n            batch = mask_batch(batch)  # masked_lm: a fresh mask for this batch"
    return ""


def after_setup(w) -> str:
    """Lines after the model and optimizer are made and a checkpoint is restored."""
    if _td(w) is None:
        return ""
    return f'''
    sync_target(raw_model)  # td: the frozen target network starts as a copy of the online one ({_loss_line(w, _td(w))})
    if args.resume is not None and (resume / "target.safetensors").exists():
        target_network.load_state_dict(load_file(str(resume / "target.safetensors")))  # as it was at the checkpoint'''


def after_step(w) -> str:
    """Lines after each optimizer step (the step counter already advanced)."""
    if _td(w) is None:
        return ""
    return '''
            if step % TARGET_SYNC == 0:
                sync_target(raw_model)  # td: refresh the frozen target network'''


def checkpoint_save(w) -> str:
    if _td(w) is None:
        return ""
    return '''
    save_file(weights_of(target_network), str(tmp / "target.safetensors"))  # td: the frozen target network'''


def ddp_options(w) -> str:
    if not w.p.find_unused:
        return ""
    return ", find_unused_parameters=True"


def ddp_comment(w) -> str:
    if not w.p.find_unused:
        return ""
    where = w.at("find_unused_parameters") if w.p.line("find_unused_parameters") else "some parameters reach no loss"
    return f"\n    # find_unused_parameters: DDP expects no gradient for parameters that no loss reads ({where})."


def log_columns(w) -> list[str]:
    if _gan(w) is None:
        return []
    return ["val_d_loss", "val_g_loss", "val_d_accuracy"]


# -- GAN: forward, losses, the alternating step, evaluation -------------------------------


def _gan_forward(w, gan) -> str:
    shapes = w.p.noise
    first = w.p.inputs[0].name
    lines = [f'    n, device = len(batch["{first}"]), batch["{first}"].device']
    for name, shape in shapes.items():
        dims = ", ".join(["n"] + [str(d) for d in shape])
        lines.append(f"    {_var(name)} = torch.randn({dims}, device=device)  # noise input {name}, N(0, I), {w.at('loss', 'noise') if w.t.loss is not None else w.file}")
    args = ", ".join(_var(n) if n in shapes else f'batch["{n}"]' for n in w.p.model_inputs)
    call = f"(model({args}),)" if len(w.p.outputs) == 1 else f"model({args})"
    outs = ", ".join(o.name for o in w.p.outputs)
    data = ", ".join(i.name for i in w.p.inputs)
    return f'''\
def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model on a batch: {data} from the data, {", ".join(shapes)} drawn here; the outputs ({outs})."""
''' + "\n".join(lines) + f'''
    return {call}'''


def forward_and_loss(w) -> str | None:
    """forward() and loss_fn() for a GAN (None: train_script's own)."""
    gan = _gan(w)
    if gan is None:
        return None
    s = gan.spec
    path = _path(w, gan)
    at = lambda key: w.at(*path, key) if _has(w, gan, key) else _loss_line(w, gan)
    real_label = "torch.full_like(real, REAL_LABEL)" if s.real_label != 1 else "torch.ones_like(real)"
    from .train_script import _py

    consts = [f"GENERATOR = {_py(tuple(s.generator))}  # the generator's parameters (name patterns), {at('generator')}",
              f"DISCRIMINATOR = {_py(tuple(s.discriminator))}  # the discriminator's, {at('discriminator')}",
              f"D_STEPS = {s.d_steps}  # discriminator updates per generator update, {at('d_steps')}"]
    if s.real_label != 1:
        consts.append(f"REAL_LABEL = {_num(s.real_label)}  # one-sided label smoothing of the real samples' target, {at('real_label')}")
    fake, real = gan.extra["fake"], gan.extra["real"]
    return "\n".join(consts) + "\n\n\n" + _gan_forward(w, gan) + f'''


def gan_losses(outputs: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator loss, generator loss), non-saturating, on the discriminator's logits ({_loss_line(w, gan)}):
    L_D = BCE(D(x), {"REAL_LABEL" if s.real_label != 1 else "1"}) + BCE(D(G(z)), 0) and L_G = BCE(D(G(z)), 1) = -log D(G(z)), means over the batch."""
    fake, real = outputs[{fake}], outputs[{real}]  # {s.fake}: D on generated samples, {s.real}: D on real ones
    d_loss = F.binary_cross_entropy_with_logits(real, {real_label}) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    g_loss = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    return d_loss, g_loss


def loss_fn(outputs: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_D + L_G: the `loss` of progress lines (the separate losses are in evaluate)."""
    d_loss, g_loss = gan_losses(outputs, batch)
    return d_loss + g_loss


def players(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The generator's and the discriminator's parameters, by name (GENERATOR, DISCRIMINATOR)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    generator, discriminator = [], []
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in GENERATOR):
            generator.append(p)
        elif any(fnmatch.fnmatchcase(name, pat) for pat in DISCRIMINATOR):
            discriminator.append(p)
    return generator, discriminator'''


def train_step(w) -> str | None:
    gan = _gan(w)
    if gan is None:
        return None
    t = w.t
    uses_l2 = bool(t.optimizer.l2) or any(g.l2 for g in t.optimizer.groups)
    backward = "(loss + l2_penalty(optimizer)).backward()" if uses_l2 else "loss.backward()"
    clip = (f"\n    torch.nn.utils.clip_grad_norm_(player, CLIP_GRAD_NORM)  # {w.at('clip_grad_norm')}"
            if t.clip_grad_norm is not None else "")
    first = w.p.inputs[0].name
    if t.precision == "bf16":
        autocast = f'with torch.autocast(batch["{first}"].device.type, dtype=torch.bfloat16):  # mixed precision, {w.at("precision")}'
        d_fwd = f"        {autocast}\n            d_loss, _ = gan_losses(forward(model, batch), batch)"
        g_fwd = f"    {autocast}\n        _, g_loss = gan_losses(forward(model, batch), batch)"
    else:
        d_fwd = "        d_loss, _ = gan_losses(forward(model, batch), batch)"
        g_fwd = "    _, g_loss = gan_losses(forward(model, batch), batch)"
    return f'''\
def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, player: list, other: list) -> None:
    """Backpropagate `loss` and move `player`'s parameters only: the other player's gradients are
    cleared first, and torch's optimizers skip parameters without gradients. So the one
    optimizer acts as two (per-parameter state; each player's lr from its parameter group)."""
    {backward}
    for p in other:
        p.grad = None  # the other player stands still in this update{clip}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """One GAN step ({_loss_line(w, gan)}): D_STEPS discriminator updates, then one generator update,
    each on fresh noise and this step's real batch. Returns L_D + L_G (of this process)."""
    generator, discriminator = players(model)
    (batch,) = micro_batches
    for _ in range(D_STEPS):
{d_fwd}
        update(optimizer, d_loss, discriminator, generator)
{g_fwd}
    update(optimizer, g_loss, generator, discriminator)
    return (d_loss + g_loss).detach().float().cpu()'''


def evaluate(w) -> str | None:
    gan = _gan(w)
    if gan is None:
        return None
    size = "EVAL_BATCH_SIZE" if w.t.eval and w.t.eval.batch_size else "BATCH_SIZE"
    first = w.p.inputs[0].name
    fake, real = gan.extra["fake"], gan.extra["real"]
    return f'''\
@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = {size}) -> dict[str, float]:
    """The players' losses on `data` (with fresh noise), and the discriminator's accuracy: the
    fraction of its calls that are right (real samples called real, logit > 0; generated
    ones called fake). 0.5 means it cannot tell them apart. Sums over processes under torchrun."""
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    index = torch.arange(rank, len(data["{first}"]), world)
    totals = torch.zeros(4, dtype=torch.float64)  # [L_D * samples, L_G * samples, right calls, samples]
    for start in range(0, len(index), batch_size):
        batch = {{k: v[index[start:start + batch_size]] for k, v in data.items()}}
        outputs = forward(model, batch)
        fake, real = outputs[{fake}], outputs[{real}]
        d_loss, g_loss = gan_losses(outputs, batch)
        n = len(batch["{first}"])
        right = (real > 0).sum() + (fake <= 0).sum()
        totals += torch.tensor([d_loss.item() * n, g_loss.item() * n, right.item(), n], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    d_loss, g_loss, right, n = totals.tolist()
    return {{"loss": (d_loss + g_loss) / n, "d_loss": d_loss / n, "g_loss": g_loss / n, "d_accuracy": right / (2 * n)}}'''


# -- data: an image folder --------------------------------------------------------------------


def image_folder(w, split_call: str) -> str:
    """make_data for `data: {kind: image_folder}`: class subfolders of images, read with Pillow."""
    d = w.t.data
    image = w.p.inputs[0]
    channels, height, width = image.shape[1:]
    target = d.target or (w.p.losses[0].output if w.p.targets else None)
    classes = next((o.shape[-1] for o in w.p.outputs if o.name == target), None)
    lines = []
    if tuple(d.range) != (0.0, 1.0):
        lo, hi = d.range
        lines.append(f"    x = {_num(lo)} + {_num(hi - lo)} * x  # values in [{_num(lo)}, {_num(hi)}], {w.at('data', 'range')}")
    arrays = f'{{"{image.name}": x, "{target}": torch.tensor(labels)}}' if target else f'{{"{image.name}": x}}'
    too_many = f'''
    if len(classes) > {classes}:
        sys.exit(f"error: {{path}} has {{len(classes)}} class folders; the model scores {classes} classes")''' if classes else ""
    return f'''\
DATA = "{w.p.data_paths[0]}"  # {w.at("data", "path")} (--data overrides)
IMAGE_SIZE = ({height}, {width})  # [height, width] of input {image.name}
IMAGE_MODE = "{"L" if channels == 1 else "RGB"}"  # {"grey, 1 channel" if channels == 1 else "RGB, 3 channels"}
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def make_data(path: str = DATA) -> dict[str, dict[str, torch.Tensor]]:
    """Images in class subfolders of `path` ({w.at("data", "kind")}): class k is the k-th folder name in
    sorted order; each image is converted to IMAGE_MODE, resized to IMAGE_SIZE (bilinear) and scaled to [0, 1]."""
    try:
        from PIL import Image
    except ImportError:
        sys.exit("error: image_folder data is read with Pillow: pip install pillow")
    classes = sorted(folder.name for folder in Path(path).iterdir() if folder.is_dir()){too_many}
    images, labels = [], []
    for k, name in enumerate(classes):
        for file in sorted((Path(path) / name).iterdir()):
            if file.suffix.lower() not in EXTENSIONS:
                continue
            with Image.open(file) as img:
                img = img.convert(IMAGE_MODE).resize((IMAGE_SIZE[1], IMAGE_SIZE[0]), Image.BILINEAR)
                images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
            labels.append(k)
    if not images:
        sys.exit(f"error: no images ({{', '.join(EXTENSIONS)}}) in class subfolders of {{path}}")
    x = torch.stack(images)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # [n, channels, height, width]
''' + "\n".join(lines) + ("\n" if lines else "") + f'''\
    arrays = {arrays}
    return {split_call}'''
