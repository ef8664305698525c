"""The patched FFN: a frozen base FFN plus patch neurons (key, bias, value).

A patch neuron p adds `act(q · k_p + b_p) * v_p` to the FFN output at every position, where q is
the FFN input at that position. The base module stays intact as `base` and is never modified;
`detach` puts it back exactly where it was, so the model is restored bit for bit.

Neurons are buffers, not parameters: they are trained elsewhere (trainer.py, on cached tensors),
then added here already final. Each neuron carries the edit id it belongs to, so an edit (one or
several neurons) can be removed again.

Neurons are kept in float32 whatever the model's dtype: they are trained and gated in float32
on cached tensors cast up, and saved in float32. A bfloat16 model runs them in its own dtype, from
a copy made once per change of the neuron set: on a GPU a float32 product beside bfloat16 tensor
cores would cost more than the whole patch is worth (10,000 neurons of an 8B-size model are about
1 % of its work in bfloat16, several times that in float32). The difference is one bfloat16
rounding of the neurons (tests/test_patching_parity.py bounds it).

Inference cost (issue 20: 10,000 neurons must cost a few percent, not +60 %). Three exact savings:
- Positions. The patched FFN is the last one, and everything after it is per position, so its
  output at a position reaches only that position's logits. A hook on the model's forward says
  which positions the current call reads: position 0 for a classifier (its head pools there), the
  last `logits_to_keep` for a causal LM (generate() asks for 1 in prefill), every position when
  hidden states are requested or the model is called in any other way. Only those positions get
  the patch. The last layer's keys and values for attention come from its input, not from the
  FFN, so a KV cache is unaffected.
- One product for all keys: q [R, d] @ keys.T [d, n], the keys of every patch in one matrix.
- The value product only over neurons that fire on some row: a relu or relu-cap neuron is exactly
  0 elsewhere, and adding exact zeros changes no bit.
- On a CPU, the keys prepacked in blocks (PACK_BLOCK, PACK_SMALL) into oneDNN's layout
  (`torch.ops.mkldnn`, the layout torch's own frozen Linear layers use), the bias fused in. A
  plain matmul packs the [n, d] keys again on every call, which at 16 rows is much of its cost:
  at 9,221 fever-minilm neurons the key product of 16 rows takes 2.8 ms instead of 4.9 ms
  (docs/results/scale-20/pruning-bounds.json). Its rows do not depend on how many rows are
  computed together, so the position cut stays bit-identical to the dense layer
  (tests/test_patching_sparse.py).
No bound that skips blocks of keys is used, measured on the 10,000-edit fever-minilm model with
512 held-out inputs (docs/results/scale-20/pruning-bounds.json): Cauchy-Schwarz per neuron prunes
0 %, a rank-128 projection plus Cauchy-Schwarz on the rest 1.3 %; only bounds from low-precision
keys (bfloat16, int8) prune ~100 %, and their products are no cheaper than float32 on a CPU
without bfloat16 or int8 matrix units.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from patching.arch import FFNSite
from patching.config import Activation
from patching.subject import running_max


def activate(pre: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation == "relu":
        return F.relu(pre)
    if activation == "relu-cap":
        # min(relu(x), 1): a capped neuron gives its whole value, never more (patching/saturation.py)
        return pre.clamp(0.0, 1.0)
    if activation == "gelu":
        return F.gelu(pre)
    raise ValueError(f"unknown patch activation {activation!r}")


def trained_as(activation: Activation) -> Activation:
    """The activation a neuron is trained with: a relu-cap neuron is trained as a relu and capped after."""
    return "relu" if activation == "relu-cap" else activation


def neuron_output(
    q: torch.Tensor, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, activation: Activation
) -> torch.Tensor:
    """q [..., d_in], keys [n, d_in], biases [n], values [n, d_out] -> added output [..., d_out]."""
    return activate(q @ keys.T + biases, activation) @ values


# a value product over the firing neurons pays for its gather only when few fire
_SPARSE_SHARE = 0.25
# CPU BLAS computes a product of 1-3 rows with other kernels than a larger one (gemv and small-M
# paths), whose sums differ in the last bit; from 4 rows on, each row's result is the same as in
# any larger product. So fewer rows are padded with zero rows: the position cut then gives the
# same pre-activations, bit for bit, as the product over every position.
_MIN_ROWS = 4


# oneDNN's prepacked product (see the module docstring); absent from some builds
_ONEDNN = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # type: ignore[no-untyped-call]
# Neurons per packed block, and per smaller block after the last full one. Only full blocks are
# packed, so an edit packs at most one small block (~0.5 ms; a large one ~3.6 ms once per 2,048)
# and the last < PACK_SMALL neurons take the plain product. The layout depends on n alone, so a
# neuron set always gives the same sums, however it was built up.
PACK_BLOCK = 2048
PACK_SMALL = 256


@dataclass(frozen=True)
class PackedKeys:
    """Keys in oneDNN's layout: (start, end, keys[start:end] packed), covering [0, end)."""

    blocks: tuple[tuple[int, int, torch.Tensor], ...]

    @property
    def end(self) -> int:
        return self.blocks[-1][1] if self.blocks else 0


def pack_layout(n: int, block: int, small: int) -> list[tuple[int, int]]:
    """The blocks packed for n neurons: full `block`s, then full `small` ones."""
    big = n // block * block
    return [(i, i + block) for i in range(0, big, block)] + [
        (i, i + small) for i in range(big, n // small * small, small)
    ]


def pack_keys(keys: torch.Tensor, done: PackedKeys | None = None) -> PackedKeys | None:
    """The blocks of keys [n, d] packed for key_product, reusing the blocks of `done` (packed from
    the same rows) that the layout keeps; None where packing does not apply (no oneDNN, not float32
    on a CPU)."""
    if not _ONEDNN or keys.device.type != "cpu" or keys.dtype != torch.float32:
        return None
    have = {(a, b): t for a, b, t in done.blocks} if done is not None else {}
    blocks = []
    for a, b in pack_layout(keys.shape[0], PACK_BLOCK, PACK_SMALL):
        packed = have.get((a, b))
        if packed is None:
            packed = torch.ops.mkldnn._reorder_linear_weight(keys[a:b].contiguous(), 16)
        blocks.append((a, b, packed))
    return PackedKeys(tuple(blocks))


def key_product(
    q: torch.Tensor, keys: torch.Tensor, biases: torch.Tensor, packed: PackedKeys | None = None
) -> torch.Tensor:
    """Pre-activations q [R, d] @ keys.T [d, n] + biases [n] -> [R, n]: the packed blocks when
    given (a forward without autograd: the packed op has no backward), the plain product for the
    rest. Every row's result is independent of the other rows either way (the position cut)."""
    rows = q.shape[0]
    if packed is None or not packed.blocks or q.requires_grad or q.dtype != torch.float32 or q.device.type != "cpu":
        return (_padded(q) @ keys.T)[:rows] + biases
    qc = q.contiguous()
    parts: list[torch.Tensor] = [
        torch.ops.mkldnn._linear_pointwise(qc, blk, biases[a:b], "none", [], "") for a, b, blk in packed.blocks
    ]
    if packed.end < keys.shape[0]:
        parts.append((_padded(q) @ keys[packed.end :].T)[:rows] + biases[packed.end :])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def sparse_neuron_output(
    q: torch.Tensor,
    keys: torch.Tensor,
    biases: torch.Tensor,
    values: torch.Tensor,
    activation: Activation,
    packed: PackedKeys | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """neuron_output for q [R, d_in], with the value product over only the neurons that fire on
    some row: for relu and relu-cap every other activation is exactly 0, so the sum is the same.
    `packed`: the keys' packed blocks, or None; `extra` [R, n]: added to the pre-activations (the
    subject term c * m of subject neurons, patching/subject.py)."""
    rows = q.shape[0]
    pre = key_product(q, keys, biases, packed)  # [R, n], a new tensor
    if extra is not None:
        pre = pre + extra.to(pre.dtype)
    if activation != "gelu" and not pre.requires_grad:
        # in place, the same values as activate(): another [R, n] tensor is a fresh allocation
        # per call, large enough to be mapped and faulted in anew (~0.3 ms at 16 x 9,221)
        act = pre.relu_() if activation == "relu" else pre.clamp_(0.0, 1.0)
    else:
        act = activate(pre, activation)
    if activation == "gelu":  # never exactly 0
        return (_padded(act) @ values)[:rows]
    live = act.any(0).nonzero().flatten()  # [f] neurons non-zero on some row
    if live.numel() > _SPARSE_SHARE * act.shape[1]:
        return (_padded(act) @ values)[:rows]
    return (_padded(act.index_select(1, live)) @ values.index_select(0, live))[:rows]  # [R, f] @ [f, d_out]


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x [R, k] with zero rows appended up to _MIN_ROWS (see there)."""
    if x.shape[0] >= _MIN_ROWS:
        return x
    return torch.cat([x, x.new_zeros(_MIN_ROWS - x.shape[0], x.shape[1])])


# positions of [B, T, d] whose outputs a forward reads; None = every position
Read = slice | torch.Tensor | None


def patch_at(
    out: torch.Tensor,
    q: torch.Tensor,
    read: Read,
    neurons: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    activation: Activation,
    packed: PackedKeys | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [B, T, d] + the neurons' output for q [B, T, d], at the `read` positions only
    (`packed`: the keys' packed blocks, or None; `extra`: added to the pre-activations, [B, T, n], or
    [B, k, n] at the read positions when `read` picks them)."""
    keys, biases, values = neurons
    if read is None or q.ndim != 3:
        flat = q.reshape(-1, q.shape[-1])  # [B*T, d]
        ex = extra.reshape(flat.shape[0], -1) if extra is not None else None
        delta = sparse_neuron_output(flat, keys, biases, values, activation, packed, ex)
        return out + delta.reshape(out.shape).to(out.dtype)
    qr = q[:, read]  # [B, k, d]
    ex = extra.reshape(-1, extra.shape[-1]) if extra is not None else None
    delta = sparse_neuron_output(qr.reshape(-1, q.shape[-1]), keys, biases, values, activation, packed, ex)
    out = out.clone()  # the base's output stays as it was (autograd may hold it)
    out[:, read] += delta.reshape(qr.shape[0], qr.shape[1], -1).to(out.dtype)
    return out


class PatchedFFN(nn.Module):
    """Wraps the `ffn_out` module of the patched layer; see the module docstring."""

    # buffers, registered in __init__ (declared here for the type checker)
    keys: torch.Tensor  # [n, d]
    biases: torch.Tensor  # [n]
    values: torch.Tensor  # [n, d]

    def __init__(self, base: nn.Module, hidden_size: int, activation: Activation, q_from_input: bool):
        super().__init__()
        self.base = base
        self.activation: Activation = activation
        # True when the wrapped module is the whole FFN (its first input is q); otherwise a
        # forward pre-hook on the FFN's input module stores q in `_q` just before we run
        self.q_from_input = q_from_input
        self._q: torch.Tensor | None = None
        # positions the current top-level forward reads (set by the model's pre-hook, consumed
        # here, see the module docstring); `dense` makes every position get the patch (capture)
        self.read: Read = None
        self.dense = False
        ref = next(base.parameters())
        kw: dict[str, Any] = {"dtype": torch.float32, "device": ref.device}  # see the module docstring
        self.register_buffer("keys", torch.zeros(0, hidden_size, **kw))  # [n, d]
        self.register_buffer("biases", torch.zeros(0, **kw))  # [n]
        self.register_buffer("values", torch.zeros(0, hidden_size, **kw))  # [n, d]
        self.edit_ids: list[str] = []  # one entry per neuron
        # (dtype, keys, biases, values): the neurons in the model's dtype, made when first needed
        self._cast: tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # the keys' full blocks packed for oneDNN (pack_keys), and the keys tensor and its version
        # counter they were packed from: a new keys tensor (remove, restore, .to()) or a write
        # into it (load_state_dict) packs again; add() keeps them (it only appends rows)
        self._pack: PackedKeys | None = None
        self._pack_of: tuple[torch.Tensor, int] | None = None
        # a neuron being trained by the reference trainer (full forward every step); never saved
        self.candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # (keys, biases, values) buffers with spare rows that the registered ones are views of (add)
        self._spare: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # when a list: each forward appends q at the positions it reads, [B, k, d] (patching/provenance.py)
        self.tap: list[torch.Tensor] | None = None
        # subject neurons (patching/subject.py): (w [n, d_s], a [n], c [n]) per neuron, zeros for an
        # ordinary one; None while no neuron has a detector. The neurons of one edit share its
        # detector, so the forward scores each distinct (w, a) once (`_table`: w_u [u, d_s], a_u [u]
        # and each neuron's row inv [n], rebuilt when det changes; about 4 neurons per edit).
        # attach_subject hooks layer L_s, whose pre-hook leaves the running max m [B, T, u] in `_m`
        # for this forward; `_carry` [B, u] is m at the last position of the previous call, used
        # when that call's sequences go on (decoding with a KV cache: `continuing`, set with `valid`
        # by the model's pre-hook)
        self.det: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._table: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.subject_layer: int | None = None
        self._m: torch.Tensor | None = None
        self._carry: torch.Tensor | None = None
        self.continuing = False
        self.mask: torch.Tensor | None = None  # [B, past + T] the call's attention mask, if given

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        q = args[0] if self.q_from_input else self._q
        self._q = None
        if q is None:
            raise RuntimeError("PatchedFFN ran without its input q: the ffn_in hook did not fire")
        read, self.read = (None if self.dense else self.read), None
        if self.tap is not None:
            self.tap.append((q if read is None or q.ndim != 3 else q[:, read]).detach().float())
        extra = None
        if self.det is not None and self.n:
            m, self._m = self._m, None
            w_u, _, inv = self.detectors()
            if m is None or m.shape[-1] != w_u.shape[0]:
                raise RuntimeError("subject neurons ran without the running max of their layer (attach_subject)")
            if read is not None and q.ndim == 3:
                m = m[:, read]  # [B, k, u]: only the positions whose outputs are read
            extra = m.index_select(-1, inv) * self.det[2].to(m)  # [B, T or k, n]: c * m of each neuron
        if self.n:
            out = patch_at(out, q, read, self._neurons(q.dtype), self.activation, self._packed(q.dtype), extra)
        if self.candidate is not None:
            # trained as its activation trains (a relu-cap neuron is capped after)
            out = patch_at(out, q.float(), read, self.candidate, trained_as(self.activation))
        return out

    def _neurons(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The neurons in `dtype` (the float32 buffers themselves for a float32 model)."""
        if dtype == self.keys.dtype:
            return self.keys, self.biases, self.values
        if self._cast is None or self._cast[0] != dtype or self._cast[1].device != self.keys.device:
            self._cast = (dtype, self.keys.to(dtype), self.biases.to(dtype), self.values.to(dtype))
        return self._cast[1], self._cast[2], self._cast[3]

    def _packed(self, dtype: torch.dtype) -> PackedKeys | None:
        """The float32 keys' blocks, packed when first needed; None for other dtypes."""
        if dtype != torch.float32:
            return None
        keys = self.keys
        done = self._pack if self._pack_valid() else None
        layout = pack_layout(keys.shape[0], PACK_BLOCK, PACK_SMALL)
        if done is None or [(a, b) for a, b, _ in done.blocks] != layout:
            self._pack = pack_keys(keys, done)
        self._pack_of = (keys, keys._version)
        return self._pack

    def _pack_valid(self) -> bool:
        return self._pack_of is not None and self._pack_of[0] is self.keys and self._pack_of[1] == self.keys._version

    def detectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distinct detectors w_u [u, d_s], a_u [u], and the row of each neuron's inv [n]."""
        assert self.det is not None
        if self._table is None or self._table[0] is not self.det:
            w, a, _ = self.det
            rows, inv = torch.unique(torch.cat([w, a[:, None]], 1), dim=0, return_inverse=True)
            self._table = (self.det, rows[:, :-1].contiguous(), rows[:, -1].contiguous(), inv)
            self._carry = None  # its columns were the old table's rows
        return self._table[1], self._table[2], self._table[3]

    def subject_scores(self, g: torch.Tensor) -> torch.Tensor:
        """Detector scores w . g + a [B, T, u] of layer L_s's input g [B, T, d_s], per distinct detector."""
        w, a, _ = self.detectors()
        return g.float() @ w.T + a

    def add(
        self,
        keys: torch.Tensor,
        biases: torch.Tensor,
        values: torch.Tensor,
        edit_id: str,
        subject: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Append neurons keys [m, d], biases [m], values [m, d], all belonging to `edit_id`;
        `subject`: their detectors (w [m, d_s], a [m], c [m]) when they are subject neurons."""
        if keys.ndim != 2 or keys.shape != values.shape or biases.shape != (keys.shape[0],):
            raise ValueError(f"bad neuron shapes {tuple(keys.shape)} {tuple(biases.shape)} {tuple(values.shape)}")
        n, m = self.n, int(keys.shape[0])
        if subject is not None or self.det is not None:
            if subject is not None and self.subject_layer is None:
                raise ValueError("subject neurons need attach_subject first")
            self._add_subject(n, m, subject)
        packed_before = self._pack_valid()
        grow = self._spare is None or self._spare[0].shape[0] < n + m
        if (
            not grow
            and self._spare is not None
            and (self._spare[0].device != self.keys.device or (n and self._spare[0].data_ptr() != self.keys.data_ptr()))
        ):
            grow = True  # the buffers were replaced (remove, restore, .to(device)): start a new spare
        if grow:
            # room for as many again: appending m neurons then copies m rows, not all n (a torch.cat
            # per edit copied every neuron every time: 31 MB per edit at 10,000 fever-minilm patches)
            cap = max(2 * (n + m), 64)
            ref = self.keys
            spare = tuple(
                torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
                for t in (ref, self.biases, self.values)
            )
            for buf, t in zip(spare, (self.keys, self.biases, self.values), strict=True):
                buf[:n] = t
            self._spare = (spare[0], spare[1], spare[2])
        assert self._spare is not None
        kb, bb, vb = self._spare
        kb[n : n + m] = keys.detach().to(kb)
        bb[n : n + m] = biases.detach().to(bb)
        vb[n : n + m] = values.detach().to(vb)
        # the registered buffers are views of the first n + m rows (state_dict and .to() see only those)
        self.keys, self.biases, self.values = kb[: n + m], bb[: n + m], vb[: n + m]
        self.edit_ids.extend([edit_id] * m)
        self._cast = None
        if packed_before:  # rows [0, n) are as they were packed
            self._pack_of = (self.keys, self.keys._version)

    def _add_subject(self, n: int, m: int, subject: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Grow the detectors by m rows (zeros for ordinary neurons: m = 0, c = 0, no effect)."""
        ref = self.keys
        if subject is None:
            assert self.det is not None
            subject = (self.det[0].new_zeros(m, self.det[0].shape[1]), ref.new_zeros(m), ref.new_zeros(m))
        w, a, c = (t.detach().to(ref) for t in subject)
        if w.shape[0] != m or a.shape != (m,) or c.shape != (m,):
            raise ValueError(f"bad detector shapes {tuple(w.shape)} {tuple(a.shape)} {tuple(c.shape)} for {m} neurons")
        if self.det is None:
            self.det = (w.new_zeros(n, w.shape[1]), ref.new_zeros(n), ref.new_zeros(n))
        self.det = (torch.cat([self.det[0], w]), torch.cat([self.det[1], a]), torch.cat([self.det[2], c]))

    def restore(self, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, edit_ids: Sequence[str]) -> None:
        """Put back a whole neuron set at once (a restart from a snapshot, patching/snapshot.py):
        keys [n, d], biases [n], values [n, d] and the edit id of each neuron, into an empty layer."""
        if self.n:
            raise ValueError(f"restore needs an empty layer; this one holds {self.n} neurons")
        if keys.ndim != 2 or keys.shape != values.shape or biases.shape != (keys.shape[0],):
            raise ValueError(f"bad neuron shapes {tuple(keys.shape)} {tuple(biases.shape)} {tuple(values.shape)}")
        if len(edit_ids) != keys.shape[0] or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"{len(edit_ids)} edit ids for neurons {tuple(keys.shape)} in a layer of width {self.keys.shape[1]}"
            )
        ref = self.keys
        self.keys, self.biases, self.values = keys.to(ref), biases.to(ref), values.to(ref)
        self.edit_ids = list(edit_ids)
        self._cast = None

    def restore_subject(self, det: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Put back the detectors (w [n, d_s], a [n], c [n]) of the neurons restore() put back."""
        w, a, c = det
        n = self.n
        if self.subject_layer is None:
            raise ValueError("subject neurons need attach_subject first")
        if w.ndim != 2 or w.shape[0] != n or a.shape != (n,) or c.shape != (n,):
            raise ValueError(f"bad detector shapes {tuple(w.shape)} {tuple(a.shape)} {tuple(c.shape)} for {n} neurons")
        ref = self.keys
        self.det = (w.to(ref), a.to(ref), c.to(ref))

    def remove(self, edit_ids: Sequence[str]) -> int:
        """Remove every neuron of the given edits; returns how many were removed."""
        drop = set(edit_ids)
        keep = [i for i, e in enumerate(self.edit_ids) if e not in drop]
        removed = self.n - len(keep)
        idx = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys = self.keys.index_select(0, idx)
        self.biases = self.biases.index_select(0, idx)
        self.values = self.values.index_select(0, idx)
        self.edit_ids = [self.edit_ids[i] for i in keep]
        if self.det is not None:
            kept = tuple(t.index_select(0, idx) for t in self.det)
            # dropped only when no detector is left: a trained gain can be exactly 0 (an edit right at
            # its init), and its detector is still the neuron's (patch files write it)
            self.det = (kept[0], kept[1], kept[2]) if bool((kept[0] != 0).any()) else None
        self._cast = None
        return removed

    def clear(self) -> None:
        self.remove(list(set(self.edit_ids)))

    @contextmanager
    def without_neurons(self) -> Iterator[None]:
        """The base layer for a moment, then the same neuron tensors back (no copy): the baseline
        of an overhead measurement and of the base's own answers."""
        keys, biases, values, ids = self.keys, self.biases, self.values, list(self.edit_ids)
        det = self.det
        self.clear()
        try:
            yield
        finally:
            self.clear()
            self.restore(keys, biases, values, ids)
            self.det = det


_HOOKS: dict[int, list[RemovableHandle]] = {}  # id(PatchedFFN) -> its hooks (ffn_in, the model)


def read_positions(kind: str, kwargs: dict[str, Any], config: Any) -> Read:
    """The positions of the last FFN's output that a top-level forward with `kwargs` reads."""
    if kwargs.get("output_hidden_states") or getattr(config, "output_hidden_states", False):
        return None  # the caller sees the last hidden state at every position
    if kind == "classification":
        return slice(0, 1)  # the head pools position 0 (arch.py: read_first)
    keep = kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep", 0))
    if isinstance(keep, torch.Tensor):
        return keep if keep.ndim == 1 else None
    if isinstance(keep, int) and keep > 0:
        return slice(-keep, None)
    return None


def attach(site: FFNSite, activation: Activation) -> PatchedFFN:
    """Wrap the site's ffn_out module (idempotent). Returns the wrapper."""
    current = site.ffn_out
    if isinstance(current, PatchedFFN):
        if current.activation != activation:
            raise ValueError(f"model already patched with activation {current.activation!r}, not {activation!r}")
        return current
    q_from_input = site.ffn_in is current
    wrapper = PatchedFFN(current, site.hidden_size, activation, q_from_input)
    hooks = _HOOKS[id(wrapper)] = []
    if not q_from_input:

        def store_q(_module: nn.Module, args: tuple[Any, ...]) -> None:
            wrapper._q = args[0]

        hooks.append(site.ffn_in.register_forward_pre_hook(store_q))

    def set_read(module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        wrapper.read = read_positions(site.spec.kind, kwargs, getattr(module, "config", None))
        wrapper.continuing = continues(kwargs)
        mask = kwargs.get("attention_mask")
        wrapper.mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def clear_read(_module: nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
        wrapper.read = None  # never left for a later call that bypasses the model's forward
        wrapper.mask, wrapper.continuing, wrapper._m = None, False, None

    hooks.append(site.model.register_forward_pre_hook(set_read, with_kwargs=True))
    hooks.append(site.model.register_forward_hook(clear_read))
    # below the last layer every position's patch reaches later positions: no position cut
    wrapper.dense = not site.last
    setattr(site.ffn_out_parent, site.ffn_out_name, wrapper)
    return wrapper


def continues(kwargs: dict[str, Any]) -> bool:
    """A top-level forward goes on with the sequences of the previous one: decoding with a KV cache
    that already holds positions (a Cache object, `cache` in transformers 5, `past_key_values`
    before; or a cache_position past 0)."""
    for name in ("cache", "past_key_values"):
        length = getattr(kwargs.get(name), "get_seq_length", None)
        if callable(length):
            return int(length()) > 0
    position = kwargs.get("cache_position")
    return isinstance(position, torch.Tensor) and bool(position.numel()) and int(position[0]) > 0


def attach_subject(site: FFNSite, wrapper: PatchedFFN, subject_site: FFNSite) -> None:
    """Hook layer L_s (`subject_site`) so that subject neurons see their running max (idempotent).

    At each forward through layer L_s the detectors score its FFN input g [B, T, d_s] and the
    running max over the positions so far is left for the patched layer. A continuing call (one
    decoding step) starts from the carried max of the previous call; any other call starts anew.
    Greedy and sampled generate() keep their sequences in order; beam search reorders them
    between steps, which the carried max does not follow."""
    if wrapper.subject_layer is not None:
        if wrapper.subject_layer != subject_site.layer_index:
            raise ValueError(f"subject neurons read layer {wrapper.subject_layer}, not {subject_site.layer_index}")
        return
    if subject_site.layer_index >= site.layer_index:
        raise ValueError("the subject layer must lie below the patched layer")

    def on_g(_module: nn.Module, args: tuple[Any, ...]) -> None:
        if wrapper.det is None or not wrapper.n:
            wrapper._carry = None
            return
        g = args[0]  # [B, T, d_s]
        d = wrapper.subject_scores(g)
        mask = wrapper.mask
        valid = mask[:, -g.shape[1] :].bool() if mask is not None and mask.shape[1] >= g.shape[1] else None
        carry = wrapper._carry
        if not wrapper.continuing or carry is None or carry.shape != (d.shape[0], d.shape[2]):
            carry = None
        m = running_max(d, valid, carry)
        wrapper._m = m
        wrapper._carry = m[:, -1]

    _HOOKS[id(wrapper)].append(subject_site.ffn_in.register_forward_pre_hook(on_g))
    wrapper.subject_layer = subject_site.layer_index


def patched(site: FFNSite) -> PatchedFFN | None:
    module = site.ffn_out
    return module if isinstance(module, PatchedFFN) else None


def detach(site: FFNSite) -> None:
    """Remove the wrapper and its hook, putting the original module back (bit-for-bit restore)."""
    wrapper = patched(site)
    if wrapper is None:
        return
    for handle in _HOOKS.pop(id(wrapper), []):
        handle.remove()
    setattr(site.ffn_out_parent, site.ffn_out_name, wrapper.base)
