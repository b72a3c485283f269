"""GPO, the Generalized Pooling Operator of VSE∞ (REFERENCE §1), as in the released code.

``pooled[b, d] = Σ_k θ_k(n_b) · (k-th largest of x[b, :n_b, d])`` where the weights θ(n) come from a
generator that sees only the set size n: sinusoidal encodings of the ranks 0..n-1 → bidirectional
GRU (directions averaged) → bias-free linear score → softmax(score / temperature).
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch
from torch import Tensor, nn

from gpo_lit.errors import expect
from gpo_lit.pooling.base import Pooling, SetMask, register_pooling, valid_mask
from gpo_lit.pooling.gru_scan import bigru_states
from gpo_lit.threads import one_thread


def positional_encoding(
    n: int, d_pe: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Sinusoidal encoding of ranks 0..n-1: ``[n, d_pe]`` in ``dtype``, ``pe[k, 2j] = sin(k·ω_j)``,
    ``pe[k, 2j+1] = cos(k·ω_j)``, ``ω_j = 10000^(-2j/d_pe)``."""
    k = torch.arange(n, dtype=dtype, device=device).unsqueeze(1)  # [n, 1]
    two_j = torch.arange(0, d_pe, 2, dtype=dtype, device=device)  # [d_pe/2]
    omega = torch.exp(two_j * (-math.log(10000.0) / d_pe))
    pe = torch.zeros(n, d_pe, dtype=dtype, device=device)
    pe[:, 0::2] = torch.sin(k * omega)
    pe[:, 1::2] = torch.cos(k * omega)
    return pe


def _index_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype that holds positions 0..n-1 (sort indices kept for backward)."""
    return torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.int64


def sort_ascending_(xt: Tensor) -> tuple[Tensor, Tensor]:
    """Sort ``xt [B, D, N]`` (contiguous) ascending along N, in place on the CPU: the values and
    the positions they came from in ``_index_dtype(N)`` (kept for backward). On the CPU a numpy
    argsort then an in-place values sort of the same rows (several times faster than
    ``torch.sort`` on many short rows); elsewhere ``torch.sort`` (traceable by torch.compile)."""
    b, d, n = xt.shape
    if xt.device.type != "cpu" or b * d * n == 0:
        vals, idx = xt.sort(dim=-1)
        return vals, idx.to(_index_dtype(n))
    return _sort_ascending_numpy_(xt)


@torch.compiler.disable
def _sort_ascending_numpy_(xt: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`sort_ascending_` on the CPU: numpy, run eagerly under torch.compile."""
    b, d, n = xt.shape
    idt = _index_dtype(n)
    idx = torch.empty(b, d, n, dtype=idt)
    idx.numpy().reshape(b * d, n)[...] = np.argsort(xt.numpy().reshape(b * d, n), axis=-1)
    xt.numpy().reshape(b * d, n).sort(axis=-1)
    return xt, idx


def sort_prefixes_(keys: np.ndarray, lengths: list[int], tail: np.ndarray | None = None) -> None:
    """Sort ``keys [S, R, N]`` (C-contiguous) in place along N over each set's first
    ``lengths[s]`` entries: numpy sorts each set's rows in place (strided rows, no copy); the
    rest of each row is untouched, or with ``tail [N]`` set to its entries. Only the valid
    entries are sorted: numpy sorts rows of up to 32 keys much faster than wider ones, and at
    GPO's sizes many sets fit where their padded rows do not. On the calling thread: numpy's sort is single-threaded, and bands of rows
    sorted by other Python threads were slower in a GPO step, not faster (the intra-op workers
    keep spinning on the other cores after each parallel op; bench/pooling_speed.py)."""
    width = keys.shape[2]
    for i, m in enumerate(lengths):
        if m > 1:
            keys[i, :, :m].sort(axis=-1)
        if tail is not None and m < width:
            keys[i, :, m:] = tail[m:]


# Keys per block and intra-op thread: 4 MiB of int64, about twice a core's L2 here, so a
# block's passes (pack, sort, unpack; backward: weigh, scatter, transpose) mostly hit cache,
# where 32 MiB blocks went to memory on every pass (bench/pooling_speed.py).
_KEY_BLOCK = 1 << 19


def _block_rows(rows: int, per_row: int) -> int:
    """Sets per block, for ``rows`` sets of ``per_row`` keys each: blocks of equal size."""
    most = max(1, _KEY_BLOCK * torch.get_num_threads() // max(1, per_row))
    blocks = -(-rows // most)
    return max(1, -(-rows // blocks))


_workspace = threading.local()


def scratch(device: torch.device, *parts: tuple[tuple[int, ...], torch.dtype]) -> list[Tensor]:
    """Uninitialised tensors of the given (shape, dtype) on ``device``. On the CPU carved from
    one buffer kept per thread and grown as needed: GPO's per-block temporaries are megabytes
    each, and a fresh one is fresh pages to fault in on every step (glibc hands large blocks back
    to the OS on free). The buffer stays allocated (one block's temporaries: 16 bytes per key of
    a block, see ``_KEY_BLOCK``). Valid until the thread's next call: for temporaries only, never
    saved. Elsewhere fresh tensors (the device's allocator caches)."""
    if device.type != "cpu":
        return [torch.empty(shape, dtype=dt, device=device) for shape, dt in parts]
    sizes = [math.prod(shape) * dt.itemsize for shape, dt in parts]
    aligned = [-(-n // 64) * 64 for n in sizes]
    buf: Tensor | None = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < sum(aligned):
        buf = _workspace.buf = torch.empty(sum(aligned), dtype=torch.uint8)
    out, at = [], 0
    for (shape, dt), n, step in zip(parts, sizes, aligned, strict=True):
        out.append(buf[at : at + n].view(dt).view(shape))
        at += step
    return out


_SIGN_FREE = 0x7FFFFFFF  # an int32's bits below its sign
_STAGE_PAD = 16  # elements added to each staged row of sort_packed (64 bytes in float32)


def _flip_negatives(bits: Tensor, spare: Tensor, out: Tensor) -> Tensor:
    """Float32 bit patterns (int32) <-> integers in the same order as the floats, into ``out``
    (may be ``bits``): a negative float's bits below the sign are flipped (larger magnitudes
    become smaller integers). Its own inverse. ``spare``: a temporary of the same shape."""
    torch.bitwise_right_shift(bits, 31, out=spare)  # -1 where negative (arithmetic), else 0
    return torch.bitwise_xor(bits, spare.bitwise_and_(_SIGN_FREE), out=out)


@torch.compiler.disable
def sort_packed(x: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor]:
    """``x [B, N, D]`` float32 on the CPU, each (b, d) sorted ascending over its first
    ``lengths[b]`` elements: the values ``[B, D, N]`` float32 (the padding after them 0) and the
    positions they came from ``[B, D, N]`` in ``_index_dtype(N)`` (the padding's its own, so the
    positions of a row are a permutation).

    ONE values-only sort, no argsort: each value becomes an int64 key, its float32 bits as an
    integer in the floats' order (:func:`_flip_negatives`) in the high half, its position in
    the low half; sorting the keys sorts the values (equal values by position, as a stable
    sort; -0.0 before +0.0) and carries the positions, and both come back exactly, NaN and inf
    included. Numpy sorts many short rows of int64 several times faster than an argsort and
    faster than float64 (no NaN handling); only the valid prefixes are sorted
    (:func:`sort_prefixes_`), on the calling thread. In cache-sized blocks (``_KEY_BLOCK``).
    """
    b, n, d = x.shape
    expect(0 < n <= 2**31, "sort_packed set width", "1..2^31 elements", n)
    expect(x.dtype == torch.float32, "sort_packed features", "float32", x.dtype)
    expect(sys.byteorder == "little", "sort_packed byte order", "little-endian", sys.byteorder)
    idt = _index_dtype(n)
    values = torch.empty(b, d, n, dtype=torch.float32)
    positions = torch.empty(b, d, n, dtype=idt)
    pos = torch.arange(n, dtype=torch.int64)  # also the padding's keys: value +0.0, own position
    per_key = 8 // idt.itemsize  # index-dtype slots per key
    step = _block_rows(b, n * d)
    for b0 in range(0, b, step):
        rows = min(step, b - b0)
        staged, spare, key = scratch(
            x.device,
            ((rows, n, d + _STAGE_PAD), torch.int32),
            ((rows, n, d + _STAGE_PAD), torch.int32),
            ((rows, d, n), torch.int64),
        )
        # Transposed reads step along N by a row stride; a power-of-two stride (D = 1024: 4 KiB)
        # maps every row to the same cache sets. Staged first into rows one cache line longer.
        bits = staged[..., :d]
        _flip_negatives(x[b0 : b0 + step].view(torch.int32), spare[..., :d], out=bits)
        key.copy_(bits.transpose(1, 2))  # transpose + widen (sign-extended) in one pass
        key.bitwise_left_shift_(32).bitwise_or_(pos)
        sort_prefixes_(key.numpy(), lengths[b0 : b0 + step], pos.numpy())
        halves = key.view(torch.int32)  # little-endian: low half, then high half of each key
        out = values[b0 : b0 + step].view(torch.int32)
        spare_out = spare.view(-1)[: out.numel()].view(out.shape)
        _flip_negatives(out.copy_(halves[..., 1::2]), spare_out, out=out)
        positions[b0 : b0 + step].copy_(key.view(idt)[..., ::per_key])
    return values, positions


def _weigh(xs: Tensor, weights: Tensor) -> Tensor:
    """``Σ_j weights[b, j] · xs[b, d, j]``: ``xs [B, D, N]``, ``weights [B, N]`` -> ``[B, D]``.
    As a row times ``xs``'s transpose (a transposed operand, no copy): the BLAS's matrix-vector
    path for ``xs @ weights`` was several times slower on the CPU (bench/pooling_speed.py)."""
    return torch.bmm(weights.unsqueeze(1), xs.transpose(1, 2)).squeeze(1)


class _SortedWeightedSum(torch.autograd.Function):
    """``out[b, d] = Σ_k theta[b, k] · sort_desc(x[b, valid, d])_k``; padding is weighted 0.
    Computed in ``theta``'s dtype whatever ``x``'s; the gradient for ``x`` comes back in x's dtype.

    Sorts each set's valid prefix ascending in a ``[B, D, N]`` copy (contiguous along the sorted
    axis, the padding after the prefix) and weights ascending position j of a set of n with
    θ[n-1-j] (one gather of θ, so no big tensor is ever flipped). Keeps for backward the sorted
    values and the sort positions in int16 (1.5x the bytes of an fp32 input). The backward is one
    scatter.

    ``x`` may be wider than ``theta`` (``[B, N', D]``, N' >= N): elements past θ's width are
    padding of every set, never sorted, and their gradient is zero (no slice of ``x`` to undo in
    the backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, valid: Tensor, packed: bool = False) -> Tensor:
        ctx.x_dtype, ctx.x_width = x.dtype, x.shape[1]
        x = x[:, : theta.shape[1]]  # a view
        b, n, d = x.shape
        pad = ~valid[..., 0]  # [B, N]: positions past each length, sorted or not
        sizes = valid.sum(dim=1)  # [B, 1]
        # [B, N]: ascending position j < n holds rank n-1-j from the top (0 past n, masked)
        ranks = (sizes - 1 - torch.arange(n, device=x.device)).clamp_(min=0)
        theta_asc = theta.gather(1, ranks).masked_fill_(pad, 0.0)  # none on padding
        cpu32 = x.device.type == "cpu" and x.dtype == theta.dtype == torch.float32
        if packed and cpu32 and b * d > 0 and sys.byteorder == "little":  # sort_packed's views
            xs, idx = sort_packed(x, sizes.squeeze(1).tolist())
        else:  # one pass: cast to θ's dtype and transpose into a fresh [B, D, N] buffer
            xt = x.transpose(1, 2).to(theta.dtype, memory_format=torch.contiguous_format, copy=True)
            xs, idx = sort_ascending_(xt.masked_fill_(pad.unsqueeze(1), float("inf")))
            # The padding now sits after each prefix, at positions >= n: zero it (0 · inf is NaN).
            xs.masked_fill_(pad.unsqueeze(1), 0.0)
        ctx.save_for_backward(xs, idx, theta_asc, ranks, pad)
        return _weigh(xs, theta_asc)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        xs, idx, theta_asc, ranks, pad = ctx.saved_tensors
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            b, d, n = xs.shape
            dtype = theta_asc.dtype
            grad_x = xs.new_empty(b, ctx.x_width, d, dtype=ctx.x_dtype)  # x's layout
            grad_x[:, n:] = 0.0  # past θ's width: padding
            step = _block_rows(b, n * d) if xs.device.type == "cpu" else b
            for b0 in range(0, b, step):  # on the CPU in cache-sized blocks, as sort_packed
                rows = slice(b0, b0 + step)
                shape = (min(step, b - b0), d, n)
                per_x, where = scratch(xs.device, (shape, dtype), (shape, torch.int64))
                where.copy_(idx[rows])
                # Each element's θ, then times the output's gradient on the way into x's layout.
                # The positions are a permutation per (b, d), so the scatter writes every entry.
                per_x.scatter_(2, where, theta_asc[rows].unsqueeze(1).expand(shape))
                torch.mul(per_x.transpose(1, 2), grad[rows].unsqueeze(1), out=grad_x[rows, :n])
        if ctx.needs_input_grad[1]:
            per_asc = torch.bmm(grad.to(xs.dtype).unsqueeze(1), xs).squeeze(1)  # [B, N]
            # Rank k of a set of n is ascending position n-1-k < n (the padding, zero here, is
            # never gathered); ranks past n have no gradient.
            grad_theta = per_asc.gather(1, ranks).masked_fill_(pad, 0.0).to(theta_asc.dtype)
        return grad_x, grad_theta, None, None


def sorted_weighted_sum(x: Tensor, theta: Tensor, valid: Tensor, packed: bool = False) -> Tensor:
    """GPO's pooling step. ``x [B, N', D]``, ``theta [B, N]`` (N <= N'),
    ``valid`` bool ``[B, N, 1]`` (a prefix per set: ``valid_mask``) -> ``[B, D]``: each dimension
    sorted descending over the valid elements, weighted by ``theta`` per rank. Padding content
    (elements past N included) never reaches the output or the gradients; θ past each length is
    taken as 0.

    ``packed``: on a little-endian CPU in fp32, :func:`sort_packed` (one values-only sort; ties by
    position, where the default argsort leaves them in another order, so gradients among equal
    values may differ); else an argsort.
    """
    return _SortedWeightedSum.apply(x, theta, valid, packed)


@register_pooling("gpo")
class GPO(Pooling):
    """Generalized Pooling Operator: ``[B, N, D], lengths [B] -> [B, D]`` (and ``θ [B, N]``).

    The generator (encoding, BiGRU, score, softmax) works in the parameters' dtype promoted to at
    least fp32: a float64 module gives float64 θ, a float32, bf16 or fp16 one fp32 θ (never
    autocast: a 0.1 temperature and -inf masks are not fp16-safe).

    θ depends only on the set size, so the generator never runs per sample: with ``lengths`` on
    the CPU it runs once per distinct length (found without a device sync); with ``lengths`` on an
    accelerator it runs once for every size 1..N in one batched call (no host sync, which a
    ``unique`` would force). In eval mode with gradients off, θ is cached per length as a table
    (cleared on every ``train(mode)``, device/dtype move and state-dict load, and rebuilt if any
    parameter changed in place).
    """

    def __init__(
        self,
        *,
        dim: int,
        d_pe: int = 32,
        d_hidden: int = 32,
        temperature: float = 0.1,
        cpu_kernels: bool = True,
    ) -> None:
        super().__init__(dim=dim)
        expect(
            isinstance(d_pe, int) and d_pe > 0 and d_pe % 2 == 0,
            "gpo d_pe",
            "an even int > 0",
            d_pe,
        )
        expect(isinstance(d_hidden, int) and d_hidden > 0, "gpo d_hidden", "an int > 0", d_hidden)
        expect(temperature > 0, "gpo temperature", "a number > 0", temperature)
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.temperature = float(temperature)
        # CPU: the generator's BiGRU via pooling.gru_scan, the sort via sort_packed (faster; the
        # default, as in the config). False: nn.GRU + argsort as the authors' code, equal to it
        # to float rounding and tie order.
        self.cpu_kernels = bool(cpu_kernels)
        # Names match the authors' checkpoints: gpool.gru.*, gpool.linear.weight.
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        # Eval cache: row n-1 is θ(n) over the table's width (zero past n); θ's dtype, no graph.
        self._table: Tensor | None = None
        self._table_stamp: tuple[tuple[int, int], ...] = ()
        self._consts: dict[tuple, tuple[Tensor, Tensor]] = {}  # see _table_inputs

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, d_pe={self.d_pe}, d_hidden={self.d_hidden}, "
            f"temperature={self.temperature}"
        )

    # ---- cache invalidation -------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._table = None

    def train(self, mode: bool = True) -> GPO:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...
        self.clear_cache()
        self._consts.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _param_stamp(self) -> tuple[tuple[int, int], ...]:
        # In-place updates (optimizer steps, copy_, load_state_dict) bump the version counter.
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def _use_cache(self) -> bool:
        # Only where θ can neither change nor need a graph: eval mode with gradients off.
        return not self.training and not torch.is_grad_enabled()

    # ---- weight generator -----------------------------------------------------------------------
    def theta_dtype(self) -> torch.dtype:
        """The dtype θ is computed and returned in: the parameters' dtype, at least fp32."""
        return torch.promote_types(self.linear.weight.dtype, torch.float32)

    def _encoding(self, width: int) -> Tensor:
        """Positional encoding of ranks 0..width-1 ``[width, d_pe]``, computed in θ's dtype and
        handed to the generator in the parameters' dtype."""
        w = self.linear.weight
        return positional_encoding(width, self.d_pe, w.device, self.theta_dtype()).to(w.dtype)

    def _gru_inputs(self, sizes: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """GRU input ``[U+1, width, d_pe]`` (each size's ranks right-aligned, then one full-length
        row) and, per size, the column holding rank k: ``[U, width, d_hidden]`` (for ``gather``)."""
        w = self.linear.weight
        rows = torch.cat([sizes, sizes.new_full((1,), width)])
        ranks = torch.arange(width, device=w.device)
        shift = (width - rows).unsqueeze(1)  # [U+1, 1]
        pe = self._encoding(width)
        inp = pe[(ranks - shift).clamp(min=0)]  # columns in front of a row's ranks: filler
        col = (shift[:-1] + ranks).clamp(max=width - 1)  # ranks past the size: masked later
        return inp, col.unsqueeze(-1).expand(-1, -1, self.d_hidden)

    def _table_inputs(self, width: int) -> tuple[Tensor, Tensor]:
        """``_gru_inputs`` for every size 1..width: constants, kept per (width, device, dtype)."""
        w = self.linear.weight
        key = (width, w.device, w.dtype)
        if key not in self._consts:
            if len(self._consts) >= 64:  # text widths vary per batch: keep this bounded
                self._consts.clear()
            # Built as ordinary tensors even under inference_mode: training reuses them later.
            with torch.inference_mode(False), torch.no_grad():
                sizes = torch.arange(1, width + 1, device=w.device)
                self._consts[key] = self._gru_inputs(sizes, width)
        return self._consts[key]

    def _scores(
        self, sizes: Tensor, width: int, inputs: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Raw scores of ranks ``0..width-1`` for set sizes ``sizes`` (``[U]`` int64, each in
        ``[1, width]``): ``[U, width]`` in θ's dtype; entries at ranks >= size are arbitrary.

        Same numbers as the released code's packed BiGRU, without packing: the forward direction
        at rank k sees ranks 0..k whatever the size, so one full-length row serves every size; the
        reverse direction needs each size's own start, so each row is right-aligned (rank k at
        column width - size + k) and the filler columns in front are only reached afterwards.
        """
        hid = self.d_hidden
        inp, col = self._gru_inputs(sizes, width) if inputs is None else inputs
        fast = self.cpu_kernels and inp.device.type == "cpu"
        if fast and inp.dtype in (torch.float32, torch.float64):
            out = bigru_states(self.gru, inp)  # [U+1, width, 2·hid]; a cheap backward
        else:
            out = self.gru(inp)[0]  # [U+1, width, 2·hid]; cuDNN on GPUs
        fwd = out[-1, :, :hid]  # [width, hid]: the forward state at rank k, for every size
        bwd = out[:-1, :, hid:].gather(1, col)  # [U, width, hid]
        return self.linear((fwd + bwd) / 2).squeeze(-1).to(self.theta_dtype())  # averaged

    def _theta_rows(
        self, sizes: Tensor, width: int, inputs: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """θ for set sizes ``sizes`` (``[U]`` int64 in ``[1, width]``): ``[U, width]``, each
        row summing to 1 and zero at ranks >= its size."""
        sizes = sizes.to(self.linear.weight.device)
        scores = self._scores(sizes, width, inputs) / self.temperature
        scores = scores.masked_fill(~valid_mask(sizes, width), float("-inf"))
        return torch.softmax(scores, dim=1)  # every row has >= 1 finite entry

    def _theta_table(self, width: int) -> Tensor:
        """θ for every size 1..width: ``[width, width]``, row n-1 = θ(n)."""
        sizes = torch.arange(1, width + 1, device=self.linear.weight.device)
        return self._theta_rows(sizes, width, self._table_inputs(width))

    def _cached_table(self, width: int) -> Tensor:
        """Eval-mode ``_theta_table`` of width >= ``width``, rebuilt only when it is too narrow or
        a parameter changed since it was built."""
        stamp = self._param_stamp()
        if self._table is None or stamp != self._table_stamp or self._table.shape[0] < width:
            self._table = self._theta_table(width).detach()
            self._table_stamp = stamp
        return self._table

    def weights_for_length(self, n: int) -> Tensor:
        """θ for a set of size ``n``: ``[n]`` on the parameters' device, sums to 1 (fp32, or
        fp64 for a float64 module)."""
        expect(isinstance(n, int) and n >= 1, "gpo weights_for_length n", "an int >= 1", n)
        with torch.autocast(device_type=self.linear.weight.device.type, enabled=False):
            if self._use_cache():
                return self._cached_table(n)[n - 1, :n]
            return self._theta_rows(torch.tensor([n]), n)[0]

    # Run eagerly under torch.compile, on every device: on the CPU hundreds of tiny ops on one
    # thread (nothing to fuse, graphs to break); on a GPU the generator is a cuDNN GRU call.
    @torch.compiler.disable
    def _batch_theta(
        self, lengths: Tensor, host: Tensor | None, n: int, device: torch.device
    ) -> tuple[Tensor, int]:
        """θ of every set in a batch, ``[B, width, …]`` on ``device``, and ``width`` (ranks past
        it are padding for everyone): from the eval cache; else once per distinct length when
        the lengths are on the CPU (no sync); else the all-sizes table, indexed on the device."""
        if self._use_cache():
            return self._cached_table(n)[lengths - 1, :n].to(device), n
        with one_thread(self.linear.weight.device):  # hundreds of tiny ops
            return self._fresh_theta(lengths, host, n, device)

    def _fresh_theta(
        self, lengths: Tensor, host: Tensor | None, n: int, device: torch.device
    ) -> tuple[Tensor, int]:
        """``_batch_theta`` through the generator (no cache)."""
        if host is not None:
            uniq, inverse = torch.unique(host, sorted=True, return_inverse=True)
            width = int(uniq[-1])  # the longest set
            return self._theta_rows(uniq, width).to(device)[inverse.to(device)], width
        return self._theta_table(n).to(device)[lengths - 1], n

    # ---- pooling --------------------------------------------------------------------------------
    # Pooling.forward checks the inputs (lengths range-checked when they are on the CPU; on an
    # accelerator they are trusted: checking would cost a host sync), builds the mask, turns
    # autocast off (a 0.1 temperature and -inf masks are not fp16-safe) and casts back.
    def _weights_shape(self, b: int, n: int) -> tuple[int, ...]:
        return (b, n)  # θ [B, N]

    def _pool_theta(self, x: Tensor, mask: SetMask) -> tuple[Tensor, Tensor, int]:
        """Pooled ``[B, D]``, ``θ [B, width, …]`` and ``width`` (ranks past it are padding for
        every set) of a non-empty batch."""
        theta, width = self._batch_theta(mask.lengths, mask.host, x.shape[1], x.device)
        valid = mask.valid[:, :width].unsqueeze(-1)  # [B, width, 1]
        pooled = sorted_weighted_sum(x, theta.to(x.dtype), valid, self.cpu_kernels)
        return pooled, theta, width

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, x.shape[2])
        return self._pool_theta(x, mask)[0]

    def pool_weights(self, x: Tensor, mask: SetMask) -> tuple[Tensor, Tensor]:
        """Pooled ``[B, D]`` and ``θ [B, N]`` (``theta_dtype()``, zero on padding)."""
        b, n, d = x.shape
        if b == 0:
            return x.new_zeros(0, d), x.new_zeros(
                self._weights_shape(0, n), dtype=self.theta_dtype()
            )
        pooled, theta, width = self._pool_theta(x, mask)
        if width < n:  # pad the rank axis (dim 1) back to N
            theta = nn.functional.pad(theta, (0, 0) * (theta.dim() - 2) + (0, n - width))
        return pooled, theta
