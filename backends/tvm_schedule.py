"""Default CPU schedules for the TVM backend: what TVM 0.27 leaves out for CPUs.

After the "zero" pipeline (legalize, FuseOps, FuseTIR) every kernel is a PrimFunc in TVM's
naive loop nest: one scalar loop per output element, no tiling, no SIMD, one thread. TVM's
dlight gives GPUs default schedules but CPUs only GEMV and row-reduction rules, so an untuned
matmul ran ~300x slower than ONNX Runtime (DESIGN.md). These rules give each kernel a
schedule from its shape alone, the way dlight does for GPUs, without measuring anything:

- `Matmul` (dense, matmul, batch matmul, and the bias / residual / activation tail FuseOps
  put after them): the right operand packed into panels of `nr` columns, a register tile of
  `mr` rows x `nr` columns accumulated over the whole reduction (the `mr` rows unrolled, the
  `nr` columns one SIMD vector group), the tail applied to the tile as it is written back,
  outer tiles over all cores. A symbolic or odd row count or width (a sequence, a
  50,257-token vocabulary) is padded to whole tiles (`pad_einsum`): bound checks inside the
  unrolled rows or the vector lanes made the kernel 3x slower, or scalar.
- `Conv2d` (NCHW, any kernel size, stride, dilation and padding, groups 1): the same
  micro-kernel with output channels as the vector axis (the kernel packed to
  [O/nr, I, KH, KW, nr] once per call) and `wr` output pixels of a row as the register rows.
- `DepthwiseConv2d` (groups = channels, MobileNet's 3x3 layers): a run of output pixels of a
  row as the vector accumulator, the taps unrolled, the padded input rows an output row reads
  made right before it (a separate padding pass over the whole map, with a division per
  element, took 9 of the 11 ms of a stride-2 layer).
- `Reduction` (layer norm, softmax, mean, ...): TVM's own `dlight.cpu.Reduction`.
- `Elementwise` (any remaining kernel of injective blocks): producers inlined, the loops of
  the output fused, vectorized and split over the cores.

Before TVM's legalization (`cpu_legalize`), three lowering choices make kernels these rules
take: `matmul(x, permute_dims(w))` (what R.linear is) becomes one `dense` kernel reading the
weight as stored (no transposed copy of every weight on every call); a weight of `main` that
a dense kernel or a convolution reads is packed into the register tile's panels by a kernel
of its own, which LiftTransformParams moves into `main_transform_params`: the runtime calls
it once when it loads the weights (lbdlc.bundle_runtime.tvm_parameters), as ONNX Runtime
pre-packs at session creation, instead of re-packing every weight on every call; and
R.nn.attention becomes four kernels (k transposed, scores with their scale and causal mask,
softmax, the weighted sum) instead of TVM's single kernel of eighteen loop nests.

Every rule returns None where it does not apply (the kernel keeps TVM's naive loops; a rule
that fails on an unforeseen kernel is treated so too, see `Guarded`). Schedule primitives
preserve what a kernel computes; tests/test_tvm_schedule.py compares scheduled libraries with
TVM's naive loops and ONNX Runtime all the same.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule, get_extent
from tvm.target import Target

# The register tile's buffer. "global": compacted to the tile's static size under its loop and
# promoted to registers by LLVM; a "local" cache of a buffer with a symbolic dimension (the
# batch size) stayed full-size, and a convolution ran 10x slower.
ACCUMULATOR_SCOPE = "global"
LANES = 8  # fp32 lanes of an AVX2 register; wider targets get the same tiles (two per register)


SMALL_WORK = 1 << 15  # multiply-adds below which a kernel keeps TVM's loops
PARALLEL_WORK = 1 << 20  # ... below which it runs on one core (a parallel launch costs ~10 us)


def _static_work(extents) -> int:
    """Iterations of a loop nest, for choosing a schedule: a symbolic extent counts as 1 when it
    is the batch size alone (batch 1 is the common case in inference), else as 64 (a sequence)."""
    total = 1
    for e in extents:
        if isinstance(e, int):
            total *= e
        elif not (isinstance(e, tirx.Var) and e.name == "batch"):
            total *= 64
    return total


def _vars_in(expr) -> set[str]:
    """Names of the variables an index expression uses (block iteration variables are
    uniquely named within a block)."""
    from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

    return {v.name for v in collect_vars_used_in_prim_expr(expr)}


def _region_vars(region) -> list[set]:
    """The block iteration variables each dimension of a buffer region's start depends on."""
    return [_vars_in(r.min) for r in region.region]


def _blocks(sch):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return sch.get_child_blocks(root) if root is not None else []


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - TVM raises its own error type
        return False


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _one_reduction(sch):
    """(blocks, the single reduction block, its statement, its iterators as "S"/"R" letters),
    or None when the kernel has no reduction or several."""
    blocks = _blocks(sch)
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    stmt = sch.get(reductions[0])
    kinds = "".join("R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in stmt.iter_vars)
    return blocks, reductions[0], stmt, kinds


def _one_reduction_kernel(func, target):
    """(a schedule of func, then what _one_reduction gives) for a CPU kernel with one reduction."""
    if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
        return None
    sch = s_tir.Schedule(func)
    found = _one_reduction(sch)
    return None if found is None else (sch, *found)


def _conv_kernel(func, target):
    """An NCHW convolution: one reduction over (c, ky, kx) writing out[n, f, y, x], two operands.
    (schedule, blocks, that block, its statement, its seven iterator names, the output region,
    the operand regions, the iterators each operand dimension uses), or None."""
    found = _one_reduction_kernel(func, target)
    if found is None:
        return None
    sch, blocks, main, stmt, kinds = found
    if kinds != "SSSSRRR" or len(stmt.writes) != 1:
        return None
    names = tuple(iv.var.name for iv in stmt.iter_vars)
    out = stmt.writes[0]
    if [_vars_in(r.min) for r in out.region] != [{v} for v in names[:4]]:
        return None
    operands = [r for r in stmt.reads if not r.source.same_as(out.source)]
    if len(operands) != 2:
        return None
    return sch, blocks, main, stmt, names, out, operands, [_region_vars(r) for r in operands]


def _padding_blocks(sch, blocks, stmt) -> list | None:
    """The blocks before a convolution: identity copies inlined; the padding blocks (which
    stay loop nests of their own) returned; None when one of them is a reduction."""
    padding = []
    for b in blocks[: [sch.get(b) for b in blocks].index(stmt)]:
        if _is_reduction(sch, b):
            return None
        if "if_then_else" not in str(sch.get(b).body):
            sch.compute_inline(b)
        else:
            padding.append(b)
    return padding


def _is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def _inline_all(sch, blocks, keep) -> bool:
    """compute_inline every block in `blocks` but those in `keep`; False if one cannot be."""
    for b in blocks:
        if any(sch.get(b).same_as(sch.get(k)) for k in keep):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001
            return False
    return True


def _pick(extent, choices, default):
    if isinstance(extent, int):
        for c in choices:
            if extent % c == 0:
                return c
    return default


def _epilogue(sch, blocks, main) -> object | None:
    """The blocks after `main` inlined into the last one; that last block (or None when
    `main` is the output). False when they cannot all be inlined."""
    order = [sch.get(b) for b in blocks]
    at = next(i for i, b in enumerate(order) if b.same_as(sch.get(main)))
    after = blocks[at + 1:]
    if not after:
        return None
    if any(_is_reduction(sch, b) for b in after):
        return False
    for b in after[:-1]:
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001
            return False
    return after[-1]


class Matmul(ScheduleRule):
    """C[batch..., m..., n] = sum_k A[batch..., m..., k] * B[batch..., k, n] (or B[..., n, k]),
    then an elementwise tail."""

    def __init__(self, mr: int = 4, nr: int = 16, pack: bool = True):
        self.mr, self.nr, self.pack = mr, nr, pack

    def apply(self, func, target, tunable):
        found = _one_reduction_kernel(func, target)
        if found is None:
            return None
        sch, blocks, main, stmt, kinds = found
        iters = list(stmt.iter_vars)
        before = blocks[: [sch.get(b) for b in blocks].index(stmt)]
        if kinds.count("R") != 1 or not kinds.endswith("R") or len(iters) < 3:
            return None
        if len(stmt.writes) != 1:
            return None
        k = iters[-1].var.name
        n = iters[-2].var.name
        out = stmt.writes[0]
        out_vars = _region_vars(out)
        if not all(len(s) == 1 for s in out_vars) or [next(iter(s)) for s in out_vars] != [iv.var.name for iv in iters[:-1]]:
            return None  # the output must be C[s0, s1, ..., n]: one iteration variable per dimension, in order
        operands = [r for r in stmt.reads if not r.source.same_as(out.source)]
        if len(operands) != 2:
            return None
        uses = [set().union(*_region_vars(r)) for r in operands]
        a_i = [i for i, u in enumerate(uses) if k in u and n not in u]
        b_i = [i for i, u in enumerate(uses) if k in u and n in u]
        if len(a_i) != 1 or len(b_i) != 1:
            return None
        A, B = operands[a_i[0]], operands[b_i[0]]
        spatial = [iv.var.name for iv in iters[:-2]]
        b_uses = uses[b_i[0]]
        batch = [v for v in spatial if v in b_uses]
        rows = [v for v in spatial if v not in b_uses]
        if not rows:
            return None
        if any(len(s) > 1 for s in _region_vars(A) + _region_vars(B)):
            return None  # plain indexing only (no x*stride + k)
        if before and not _inline_all(sch, before, []):
            return None
        n_static = get_static(iters[-2].dom.extent)
        m_static = get_static(iters[spatial.index(rows[-1])].dom.extent)
        padding = [1] * len(iters)
        if _static_work([get_static(iv.dom.extent) for iv in iters]) >= PARALLEL_WORK:
            if (isinstance(n_static, int) and n_static > self.nr and n_static % LANES) or not isinstance(n_static, int):
                # An odd n (a 50,257-token vocabulary) or a symbolic one (attention scores):
                # computed padded to a multiple of nr, so the vector loop has no per-lane bound
                # check (which would make it scalar).
                padding[-2] = self.nr
            if not (isinstance(m_static, int) and m_static % self.mr == 0):
                # Rows of a symbolic (or odd) count, a sequence: padded to a multiple of mr, so
                # the unrolled rows of the tile have no bound checks (3x faster at seq 128).
                padding[spatial.index(rows[-1])] = self.mr
        padded = padding != [1] * len(iters)
        if padded:
            sch.pad_einsum(main, padding)  # padded copies of the operands in, of the result out
            for b in _blocks(sch)[: [sch.get(x) for x in _blocks(sch)].index(sch.get(main))]:
                _schedule_elementwise(sch, b)
        epilogue = _epilogue(sch, _blocks(sch), main)
        if epilogue is False:
            return None
        # A tail that writes fewer elements than the tile computes (the columns of a last,
        # zero-filled weight panel dropped) stays a loop nest of its own as well.
        partial = epilogue is not None and not _same_size(sch.get(main).writes[0].source, sch.get(epilogue).writes[0].source)

        extents = [get_static(iv.dom.extent) for iv in iters]
        work = _static_work(extents)
        if work < SMALL_WORK:
            return None  # a tiny kernel: LLVM's code for the naive loops is as fast
        loops = sch.get_loops(main)
        # Batch axes (shared by A and B) outermost, then the rows of A; only the last row axis
        # is tiled (fusing symbolic row axes first would make the tile's region, and so the
        # write-back of the tail, inexact).
        batch_loops = [loops[spatial.index(v)] for v in batch] + [loops[spatial.index(v)] for v in rows[:-1]]
        m_loop = loops[spatial.index(rows[-1])]
        n_loop, k_loop = loops[-2], loops[-1]
        sch.reorder(*batch_loops, m_loop)
        n_extent = get_extent(sch, n_loop)
        nr = _pick(n_extent, [self.nr, LANES], self.nr)
        if isinstance(n_extent, int) and n_extent < nr:
            nr = n_extent
        mr = self.mr
        mo, mi = sch.split(m_loop, factors=[None, mr])
        no, ni = sch.split(n_loop, factors=[None, nr])
        sch.reorder(*batch_loops, no, mo, k_loop, mi, ni)
        # Pack the right operand into [.., n / nr, k, nr] panels: the micro-kernel reads it
        # contiguously. Only for an operand fixed across the batch (a weight), whose packing is
        # cheap against the matmul; it needs a static n divisible by nr.
        b_buffer = B.source
        b_shape = [get_static(d) for d in b_buffer.shape]
        b_index = next(i for i, r in enumerate(stmt.reads) if r.source.same_as(b_buffer))
        if self.pack and work >= PARALLEL_WORK and not batch and len(b_shape) == 2 and all(isinstance(d, int) for d in b_shape) and n_extent % nr == 0 and nr > 1:
            b_dims = [next(iter(s)) for s in _region_vars(B)]
            packed = sch.cache_read(main, b_index, "global")
            if b_dims == [k, n]:
                sch.transform_layout(packed, ("write", 0), lambda kk, nn: (nn // nr, kk, nn % nr))
            else:
                sch.transform_layout(packed, ("write", 0), lambda nn, kk: (nn // nr, kk, nn % nr))
            _pack_loops(sch, packed, nr, parallel=True, n_first=b_dims != [k, n])
        acc = sch.cache_write(main, 0, ACCUMULATOR_SCOPE)
        if padded or partial:
            # The tail (and the copy out of the padded result) stays a loop nest of its own:
            # reverse_compute_inline into the padded tile drops the bound on n (TVM 0.27) and
            # would write past the output.
            _schedule_elementwise(sch, epilogue)
        elif epilogue is not None:
            try:
                sch.reverse_compute_inline(epilogue)
            except Exception:  # noqa: BLE001 - the tail stays a separate loop nest
                _schedule_elementwise(sch, epilogue)
        sch.reverse_compute_at(acc, mo, preserve_unit_loops=True)  # before fusing: an exact tile
        outer = sch.fuse(*batch_loops, no, mo)
        if work >= PARALLEL_WORK:
            sch.parallel(outer)
        sch.unroll(mi)
        sch.vectorize(ni)
        sch.decompose_reduction(main, k_loop)  # after vectorize: the update block is no longer complete
        wloops = sch.get_loops(acc)
        sch.vectorize(wloops[-1])
        return sch


def _same_size(a, b) -> bool:
    """Whether two buffers provably hold as many elements."""
    from tvm.sym import Analyzer

    def numel(buffer):
        total = tirx.const(1, "int64")
        for d in buffer.shape:
            total = total * d
        return total

    return Analyzer().can_prove_equal(numel(a), numel(b))


def _pack_loops(sch, packed, nr: int, parallel: bool, n_first: bool = True) -> None:
    """The packing copy in the order of its destination [n / nr, ..., nr]: whole panels per
    thread, contiguous stores (the nr loads of a row gather from nr source rows)."""
    loops = sch.get_loops(packed)
    if n_first:  # source [n, rest...]
        no, ni = sch.split(loops[0], factors=[None, nr])
        sch.reorder(no, *loops[1:], ni)
    else:  # source [k, n]
        no, ni = sch.split(loops[1], factors=[None, nr])
        sch.reorder(no, loops[0], ni)
    sch.vectorize(ni)
    if parallel:
        sch.parallel(no)


def get_static(d):
    return int(d) if isinstance(d, tirx.IntImm) else d


def _schedule_elementwise(sch, block) -> None:
    """One loop over the output, in SIMD vectors, split over the cores when large enough."""
    loops = sch.get_loops(block)
    if not loops:
        return
    work = _static_work([get_extent(sch, lp) for lp in loops])
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = get_extent(sch, fused)
    if isinstance(extent, int) and extent <= LANES:
        return
    outer, inner = sch.split(fused, factors=[None, LANES * 4])
    if work >= PARALLEL_WORK // 16:
        sch.parallel(outer)
    _, iv = sch.split(inner, factors=[None, LANES])
    sch.vectorize(iv)


class Conv2d(ScheduleRule):
    """out[n, f, y, x] = sum_{c, ky, kx} pad(data)[n, c, y*s + ky*d, x*s + kx*d] * w[f, c, ky, kx],
    then an elementwise tail (bias, residual, activation)."""

    def apply(self, func, target, tunable):
        found = _conv_kernel(func, target)
        if found is None:
            return None
        sch, blocks, main, stmt, (nn, ff, yy, xx, rc, ry, rx), out, operands, uses = found
        iters = list(stmt.iter_vars)
        # The weight as stored [O, I, KH, KW], or packed before the call [O / nr, I, KH, KW, nr]
        # (cpu_legalize: once, in main_transform_params).
        w_i = [i for i, u in enumerate(uses) if u in ([{ff}, {rc}, {ry}, {rx}], [{ff}, {rc}, {ry}, {rx}, {ff}])]
        d_i = [i for i, u in enumerate(uses) if u[:2] == [{nn}, {rc}] and len(u) == 4 and u[2] <= {yy, ry} and u[3] <= {xx, rx}]
        if len(w_i) != 1 or len(d_i) != 1:
            return None
        weight = operands[w_i[0]]
        w_shape = [get_static(d) for d in weight.source.shape]
        if not all(isinstance(d, int) for d in w_shape):
            return None
        prepacked = len(w_shape) == 5
        channels = w_shape[0] * w_shape[4] if prepacked else w_shape[0]
        width = get_static(out.source.shape[3])
        tile = conv_tile(channels, width)
        if tile is None or (prepacked and tile[0] != w_shape[4]):
            return None
        nr, wr = tile
        # The padded input: an identity copy is inlined, real padding stays a (parallel) pass.
        padding = _padding_blocks(sch, blocks, stmt)
        if padding is None:
            return None
        for b in padding:
            _schedule_elementwise(sch, b)
        epilogue = _epilogue(sch, _blocks(sch), main)
        if epilogue is False:
            return None
        work = _static_work([get_static(iv.dom.extent) for iv in iters])
        if work < SMALL_WORK:
            return None
        if not prepacked:  # packed here, on every call
            w_index = next(i for i, r in enumerate(stmt.reads) if r.source.same_as(weight.source))
            packed = sch.cache_read(main, w_index, "global")
            sch.transform_layout(packed, ("write", 0), lambda f, c, h, w: (f // nr, c, h, w, f % nr))
            _pack_loops(sch, packed, nr, parallel=work >= PARALLEL_WORK)
        l_n, l_f, l_y, l_x, l_c, l_ky, l_kx = sch.get_loops(main)
        fo, fi = sch.split(l_f, factors=[None, nr])
        xo, xi = sch.split(l_x, factors=[None, wr])
        sch.reorder(l_n, fo, l_y, xo, l_c, l_ky, l_kx, xi, fi)
        acc = sch.cache_write(main, 0, ACCUMULATOR_SCOPE)
        # The tile accumulates with output channels innermost, the vector axis: in the output's
        # own layout (pixels innermost) each vector update is a gather and scatter of scalars,
        # which LLVM cannot keep in registers (4x slower).
        sch.transform_layout(main, ("write", 0), lambda n, f, y, x: (n, f // nr, y, x, f % nr))
        if epilogue is not None:
            try:
                sch.reverse_compute_inline(epilogue)
            except Exception:  # noqa: BLE001
                _schedule_elementwise(sch, epilogue)
        sch.reverse_compute_at(acc, xo, preserve_unit_loops=True)  # before fusing: an exact tile
        # The batch loop stays on its own: fused with the others, a symbolic batch size keeps
        # the accumulator tile from shrinking to registers (10x slower).
        outer = sch.fuse(fo, l_y, xo)
        if work >= PARALLEL_WORK:
            sch.parallel(outer)
        sch.unroll(xi)
        sch.vectorize(fi)
        sch.decompose_reduction(main, l_c)
        return sch


class DepthwiseConv2d(ScheduleRule):
    """out[n, c, y, x] = sum_{ky, kx} pad(data)[n, c, y*s + ky*d, x*s + kx*d] * w[c, 0, ky, kx]
    (groups = channels, MobileNet's 3x3 layers), then an elementwise tail: a run of `xr`
    output pixels of a row is the vector accumulator, the kernel taps unrolled, (channel, row)
    pairs over the cores."""

    def apply(self, func, target, tunable):
        found = _conv_kernel(func, target)
        if found is None:
            return None
        sch, blocks, main, stmt, (nn, ff, yy, xx, rc, ry, rx), out, operands, uses = found
        extents = [get_static(iv.dom.extent) for iv in stmt.iter_vars]
        if extents[4] != 1 or not any(u == [{ff}, {rc}, {ry}, {rx}] for u in uses):
            return None  # one input channel per output channel, a weight [C, 1, KH, KW]
        if not any(len(u) == 4 and u[0] == {nn} and u[1] == {ff, rc} and u[2] <= {yy, ry} and u[3] <= {xx, rx} for u in uses):
            return None
        work = _static_work(extents)
        if work < SMALL_WORK:
            return None
        padding = _padding_blocks(sch, blocks, stmt)
        if padding is None:
            return None
        epilogue = _epilogue(sch, _blocks(sch), main)
        if epilogue is False:
            return None
        width = get_static(out.source.shape[3])
        xr = _pick(width, [16, LANES, 7, 4], None) if isinstance(width, int) else None
        if xr is None:
            return None
        l_n, l_f, l_y, l_x, l_c, l_ky, l_kx = sch.get_loops(main)
        xo, xi = sch.split(l_x, factors=[None, xr])
        sch.reorder(l_n, l_f, l_y, xo, l_c, l_ky, l_kx, xi)
        acc = sch.cache_write(main, 0, ACCUMULATOR_SCOPE)
        if epilogue is not None:
            try:
                sch.reverse_compute_inline(epilogue)
            except Exception:  # noqa: BLE001
                _schedule_elementwise(sch, epilogue)
        sch.reverse_compute_at(acc, xo, preserve_unit_loops=True)
        outer = sch.fuse(l_f, l_y)
        for b in padding:  # the padded input rows one output row reads, made right before it
            sch.compute_at(b, outer, preserve_unit_loops=True)
            pad_loops = sch.get_loops(b)
            inner = pad_loops[-1]
            if isinstance(get_extent(sch, inner), int) and get_extent(sch, inner) >= LANES:
                _, lanes = sch.split(inner, factors=[None, LANES])
                sch.vectorize(lanes)
        if work >= PARALLEL_WORK:
            sch.parallel(outer)
        sch.unroll(l_ky)
        sch.unroll(l_kx)
        sch.vectorize(xi)
        sch.decompose_reduction(main, l_c)
        sch.vectorize(sch.get_loops(acc)[-1])
        return sch


def conv_tile(channels, width) -> tuple[int, int] | None:
    """(nr output channels: the vector axis, wr output pixels of a row: the unrolled rows) of
    the Conv2d rule's register tile; None when the channels are no multiple of a vector."""
    nr = _pick(channels, [16, LANES], None)
    if nr is None:
        return None
    wr = _pick(width, [4, 7, 6, 5, 3, 2], 4) if isinstance(width, int) else 4
    if wr > 4 and nr > LANES:
        nr = LANES  # keep wr x nr / LANES accumulators within the 16 vector registers
    return nr, wr


class Elementwise(ScheduleRule):
    """Injective kernels: producers inlined, then one fused loop, vectorized and parallel."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = _blocks(sch)
        if not blocks or any(_is_reduction(sch, b) for b in blocks):
            return None
        if _static_work([get_extent(sch, lp) for lp in sch.get_loops(blocks[-1])]) < SMALL_WORK:
            return None
        if not _inline_all(sch, blocks[:-1], []):
            sch = s_tir.Schedule(func)
            blocks = _blocks(sch)
            for b in blocks:
                _schedule_elementwise(sch, b)
            return sch
        _schedule_elementwise(sch, _blocks(sch)[-1])
        return sch


class Small(ScheduleRule):
    """A kernel whose whole loop nest is tiny keeps TVM's loops, which LLVM handles well
    (and which run without the cost of a parallel launch)."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = _blocks(sch)
        work = sum(_static_work([get_extent(sch, lp) for lp in sch.get_loops(b)]) for b in blocks)
        return sch if blocks and work < SMALL_WORK else None


class Guarded(ScheduleRule):
    """A rule whose failure on some unforeseen kernel leaves that kernel unscheduled (naive
    but correct) instead of failing the build."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            sch = self.rule.apply(func, target, tunable)
            if sch is not None:
                sch.mod["main"]
            return sch
        except Exception:  # noqa: BLE001
            return None


def rules() -> list[ScheduleRule]:
    from tvm.s_tir import dlight as dl

    return [Guarded(r) for r in (Small(), Matmul(), Conv2d(), DepthwiseConv2d(), dl.cpu.Reduction(), Elementwise())]


def default_schedule(func, target):
    """The schedule the first applicable rule gives one PrimFunc (None: TVM's loops), as
    ApplyDefaultSchedule would; `lbdlc build --tune` measures it as a tuning candidate."""
    target = target if isinstance(target, Target) else Target(target)
    with target:
        for rule in rules():
            sch = rule.apply(func, target, False)
            if sch is not None:
                return sch
    return None


def schedule_cpu(mod, target):
    """Every PrimFunc of a fused module that a rule applies to, scheduled (CPU targets only)."""
    from tvm.s_tir import dlight as dl

    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name != "llvm":
        return mod
    with target:
        return dl.ApplyDefaultSchedule(*rules())(mod)


def legalize_attention(bb, call):
    """A LegalizeOps entry for relax.nn.attention (no bias, no sliding window) on CPUs."""
    from tvm import te, topi

    if call.attrs.window_size is not None or call.attrs.causal_mask not in (None, "TopLeft"):
        from tvm.relax.transform.legalize_ops.nn import _nn_attention

        return _nn_attention(bb, call)
    q, k, v = call.args
    causal = call.attrs.causal_mask == "TopLeft"
    scale = call.attrs.scale

    def k_t(k):
        B, Skv, H, D = k.shape
        return te.compute((B, H, D, Skv), lambda b, h, d, j: k[b, j, h, d], name="k_transposed")

    def scores(q, kt):
        B, S, H, D = q.shape
        Skv = kt.shape[3]
        d = te.reduce_axis((0, D), name="d")
        s = te.compute((B, H, S, Skv), lambda b, h, i, j: te.sum(q[b, i, h, d] * kt[b, h, d, j], axis=d), name="scores")
        factor = scale if scale is not None else 1.0 / tirx.sqrt(tirx.Cast(q.dtype, D))
        if causal:
            low = tirx.min_value(q.dtype)
            return te.compute(s.shape, lambda b, h, i, j: tirx.Select(j > i, low, s[b, h, i, j] * factor), name="masked")
        return te.compute(s.shape, lambda b, h, i, j: s[b, h, i, j] * factor, name="scaled")

    def weighted(p, v):
        B, H, S, Skv = p.shape
        Dv = v.shape[3]
        j = te.reduce_axis((0, Skv), name="j")
        return te.compute((B, S, H, Dv), lambda b, i, h, e: te.sum(p[b, h, i, j] * v[b, j, h, e], axis=j), name="attention_out")

    kt = bb.emit(bb.call_te(k_t, k, primfunc_name_hint="attention_k_transposed"))
    s = bb.emit(bb.call_te(scores, q, kt, primfunc_name_hint="attention_scores"))
    p = bb.emit(bb.call_te(lambda x: topi.nn.softmax(x, axis=-1), s, primfunc_name_hint="attention_softmax"))
    return bb.call_te(weighted, p, v, primfunc_name_hint="attention_weighted")


def dense_panel(n) -> int:
    """The Matmul rule's panel width (its nr) for n output columns."""
    nr = _pick(n, [16, LANES], 16)
    return min(nr, n) if isinstance(n, int) else nr


def _pack_dense_te(w, nr: int):
    """w [n, k] -> panels [ceil(n / nr), k, nr], the last one zero-filled."""
    from tvm import te

    n, k = (int(d) for d in w.shape)
    return te.compute(((n + nr - 1) // nr, k, nr), lambda p, kk, j: tirx.if_then_else(
        p * nr + j < n, w[tirx.min(p * nr + j, n - 1), kk], tirx.const(0, w.dtype)), name="dense_panels")


def _dense_packed_te(x, panels, n: int):
    """y[..., p, j] = sum_k x[..., k] * panels[p, k, j], then the columns in order (p * nr + j < n):
    an einsum with a panel axis, which the Matmul rule tiles (and pads) like any batched matmul."""
    from tvm import te

    count, depth, nr = (int(d) for d in panels.shape)
    k = te.reduce_axis((0, depth), name="k")
    y = te.compute((*x.shape[:-1], count, nr), lambda *i: te.sum(x[(*i[:-2], k)] * panels[i[-2], k, i[-1]], axis=k), name="dense")
    return te.compute((*x.shape[:-1], n), lambda *i: y[(*i[:-1], i[-1] // nr, i[-1] % nr)], name="dense_columns")


def _pack_conv_te(w, nr: int):
    """w [O, I, KH, KW] -> [O / nr, I, KH, KW, nr]: the Conv2d rule's layout."""
    from tvm import te

    o, i, kh, kw = (int(d) for d in w.shape)
    return te.compute((o // nr, i, kh, kw, nr), lambda p, c, y, x, j: w[p * nr + j, c, y, x], name="conv_panels")


def _conv2d_packed_te(data, panels, strides, padding, dilation):
    """NCHW convolution (groups 1) over a weight packed by _pack_conv_te: TOPI's conv2d_nchw
    reading the packed layout."""
    from tvm import te, topi

    top, left, bottom, right = padding
    sh, sw = strides
    dh, dw = dilation
    nr = int(panels.shape[4])
    channels, kh, kw = int(panels.shape[0]) * nr, int(panels.shape[2]), int(panels.shape[3])
    n, c, h, w = data.shape
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp") if any(padding) else data
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    rc, ry, rx = te.reduce_axis((0, c), name="rc"), te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    return te.compute((n, channels, out_h, out_w), lambda b, f, y, x: te.sum(
        padded[b, rc, y * sh + ry * dh, x * sw + rx * dw] * panels[f // nr, rc, ry, rx, f % nr], axis=[rc, ry, rx]),
        name="conv2d_nchw")


def _dense_te(x, w):
    """y[..., n] = sum_k x[..., k] * w[n, k]: a linear layer reading its weight as stored."""
    from tvm import te

    k = te.reduce_axis((0, w.shape[1]), name="k")
    return te.compute((*x.shape[:-1], w.shape[0]), lambda *i: te.sum(x[(*i[:-1], k)] * w[i[-1], k], axis=k), name="dense")


def _cpu_rewriter():
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul, permute, conv2d = tvm_op("relax.matmul"), tvm_op("relax.permute_dims"), tvm_op("relax.nn.conv2d")

    @mutator
    class CpuRewriter(PyExprMutator):
        """Linear layers and convolutions as the kernels the CPU rules schedule best.

        - matmul(x, permute_dims(w)) with a 2-D w (what R.linear is) -> one `dense` kernel that
          reads w in place: no transposed copy of every weight on every call;
        - when w is a parameter of `main` (a weight, not an activation), the dense kernel and an
          NCHW convolution (groups 1) read it packed in the register tile's panels, packed by a
          kernel of its own that depends on the weight alone: LiftTransformParams moves it to
          `main_transform_params`, which the runtime calls once when it loads the weights
          (ONNX Runtime pre-packs at session creation the same way). Packing on every call cost
          a read and a write of every weight per inference.
        """

        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.weights: list = []

        def transform(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    inputs = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(func.params)
                    self.weights = list(func.params[inputs:])
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def is_weight(self, expr) -> bool:
            return isinstance(expr, relax.Var) and any(expr.same_as(w) for w in self.weights)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(conv2d):
                return self.conv2d(call)
            if not call.op.same_as(matmul) or not isinstance(call.args[1], relax.Var):
                return call
            bound = self.lookup_binding(call.args[1])
            if not (isinstance(bound, relax.Call) and bound.op.same_as(permute)):
                return call
            w, x = bound.args[0], call.args[0]
            axes = bound.attrs.axes
            if len(w.ty.shape) != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]) or len(x.ty.shape) < 2:
                return call
            if x.ty.dtype != w.ty.dtype or x.ty.dtype != call.ty.dtype:
                return call
            if not all(isinstance(d, (tirx.IntImm, tirx.Var)) for d in x.ty.shape):
                # an input length like `seq + 1` (after a class token): FuseTIR cannot map the
                # call_te kernel's parameters onto it (InternalError), so TVM's matmul stays
                return call
            if self.is_weight(w) and all(isinstance(d, tirx.IntImm) for d in w.ty.shape):
                n = int(w.ty.shape[0])
                panels = self.builder_.emit(self.builder_.call_te(_pack_dense_te, w, dense_panel(n), primfunc_name_hint="pack_dense"))
                return self.builder_.call_te(_dense_packed_te, x, panels, n, primfunc_name_hint="dense")
            return self.builder_.call_te(_dense_te, x, w, primfunc_name_hint="dense")

        def conv2d(self, call):
            x, w = call.args
            a = call.attrs
            if not self.is_weight(w) or int(a.groups) != 1 or a.data_layout != "NCHW" or a.kernel_layout != "OIHW" \
                    or a.out_layout != "NCHW" or not all(isinstance(d, tirx.IntImm) for d in w.ty.shape) \
                    or len({x.ty.dtype, w.ty.dtype, call.ty.dtype}) != 1:
                return call
            width = call.ty.shape[3]
            tile = conv_tile(int(w.ty.shape[0]), int(width) if isinstance(width, tirx.IntImm) else width)
            if tile is None:
                return call
            panels = self.builder_.emit(self.builder_.call_te(_pack_conv_te, w, tile[0], primfunc_name_hint="pack_conv2d"))
            return self.builder_.call_te(
                _conv2d_packed_te, x, panels, [int(v) for v in a.strides], [int(v) for v in a.padding],
                [int(v) for v in a.dilation], primfunc_name_hint="conv2d")

    return CpuRewriter


def tvm_op(name: str):
    import tvm

    return tvm.ir.Op.get(name)


def cpu_legalize(mod):
    """lbdlc's CPU lowering choices before TVM's LegalizeOps: linear layers as `dense` kernels
    over the weight as stored, attention as four scheduled kernels."""
    from tvm import relax

    mod = relax.transform.DeadCodeElimination()(_cpu_rewriter()(mod).transform())
    mod = relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.attention": legalize_attention})(mod)
    return relax.transform.LiftTransformParams()(mod)
