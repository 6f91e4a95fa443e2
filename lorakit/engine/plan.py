"""Merge planning: every adapter tensor resolved to a base tensor of the right shape before anything is written."""

import math
from dataclasses import dataclass, field

import torch

from ..core import Module
from ..core.algebra import weighted_stack
from ..core.linalg import frobenius_norm
from ..errors import LorakitError, opt
from ..naming.embeddings import HEAD, is_embedding
from ..spec import fingerprint
from .landing import onto_base, renaming_note


@dataclass
class TensorPlan:
    """What to do with one output tensor: its source tensor in the base, and what the adapters add to it."""

    name: str
    source: str  # base tensor read (differs from name only for an untied lm_head)
    loras: list = field(default_factory=list)  # [(Module, weight)]
    biases: list = field(default_factory=list)  # [(Module, weight)]
    replacement: torch.Tensor = None
    deltas: list = field(default_factory=list)  # [(full tensor added, weight)]
    # [core.multiplicative.Transform]: W' = f(W), applied first
    transforms: list = field(default_factory=list)
    # [(Module, weight, first row)]: LoRAs on rows of the tensor (a fused qkv's q, one expert of a 3-D MoE tensor),
    # kept at their own size: padded to the whole tensor only where a computation needs it
    slices: list = field(default_factory=list)
    padded_shape: tuple = None  # the output's shape where a LoRA widens the base weight (Module.pads_base)

    @property
    def touched(self):
        changes = self.loras or self.slices or self.biases or self.deltas or self.transforms
        return bool(changes) or self.replacement is not None

    def all_loras(self, rows):
        """Every LoRA as a delta of the whole tensor of `rows` rows: the slices padded with zero rows (exact)."""
        padded = [
            (on_rows(m, self.source, start, start + m.shape[0], rows), w) for m, w, start in self.slices
        ]
        return self.loras + padded


@dataclass
class MergePlan:
    tensors: dict  # output tensor name -> TensorPlan
    untie: str = None  # the tied embedding written apart from a new lm_head, or None
    skipped: list = field(default_factory=list)  # adapter tensors the base lacks (--skip-unmatched)
    elsewhere: list = field(default_factory=list)  # modules for another file of the model (Adapter.elsewhere)
    # the embedding's rows where added tokens grew it (PEFT modules_to_save), else None
    vocab_size: int = None
    # the adapter (a path) whose added tokens the output's tokenizer files must have
    tokenizer_from: str = None
    notes: list = field(default_factory=list)  # what planning decided (modules renamed onto the base's names)


def plan_merge(base, adapters, options):
    """Resolve every adapter tensor (adapters: [(label, Adapter, weight)], on the base's names) to a tensor of the
    Base `base` (quantized weights by their full-precision shapes). Raises one error listing everything that does
    not fit; with `options.skip_unmatched`, tensors the base lacks are skipped instead (a shape that differs stays
    an error: that is another base)."""
    planner = Planner(base, options)
    for label, ad, w in adapters:
        planner.label = label
        if planner.check_fingerprint(label, ad):  # another base: that is the one thing to say
            ad = planner.land(ad)
        planner.adapter_elsewhere = set(ad.elsewhere)
        for m in ad.modules.values():
            planner.add_module(m, w)
        for name, t in ad.deltas.items():
            planner.add_delta(name, t, w)
        for name, t in ad.replacements.items():
            planner.add_replacement(name, t)
        for t in ad.transforms.values():
            planner.add_transform(t, w)
    return planner.finish()


class Planner:
    def __init__(self, base, options):
        self.base, self.options = base, options
        self.tensors, self.problems, self.skipped, self.hints = {}, [], [], set()
        self.elsewhere, self.adapter_elsewhere, self.reported = [], set(), set()
        self.label, self.grew_from = None, set()  # the adapter being added; those adding tokens
        self.notes = []
        self.embed = (
            next((n for n in base.ckpt.where if is_embedding(n)), None) if base.tied_embeddings else None
        )
        # the fingerprint sees a quantized base as its full-precision weights, so adapters for the original fit
        self.fingerprint = fingerprint(base.shapes())

    def target(self, name):
        """The plan of base tensor `name` (a tied head: of its embedding), or None."""
        if name in self.base:
            return self.tensors.setdefault(name, TensorPlan(name, name))
        if name == HEAD and self.embed is not None:  # tied head, stored only as the embedding
            return self.tensors.setdefault(name, TensorPlan(name, self.embed))
        return None

    def land(self, ad):
        """The adapter under the base's names; what lands nowhere noted once, as LK601 (with --skip-unmatched
        only where nothing lands)."""
        ad, found = onto_base(self.base, ad)
        if found.renamed:
            self.notes.append(f"{self.label}: {renaming_note(found.renamed)}")
        if found.nowhere and (not self.options.skip_unmatched or found.nothing_lands):
            self.problems.append(f"[LK601] {found.summary()}")
            self.reported.update(f"{n.module}.weight" for n in found.nowhere)
            if not found.nothing_lands:
                self.hints.add(f"{opt('skip_unmatched', True)} merges the tensors the base has")
        return ad

    def unmatched(self, name, problem):
        if name in self.reported:
            return
        if name[: -len(".weight")] in self.adapter_elsewhere:
            self.elsewhere.append(name)
        elif self.options.skip_unmatched:
            self.skipped.append(name)
        else:
            self.problems.append(problem)
            self.hints.add(f"{opt('skip_unmatched', True)} merges the tensors the base has")

    def check_fingerprint(self, label, ad):
        """Whether the adapter may be for this base (a problem noted where its fingerprint names another)."""
        if (
            ad.base_fingerprint
            and ad.base_fingerprint != self.fingerprint
            and not self.options.ignore_fingerprint
        ):
            self.problems.append(
                f"{label} was made for another base (fingerprint {ad.base_fingerprint[:15]}... != "
                f"{self.fingerprint[:15]}...; {opt('ignore_fingerprint', True)} to merge anyway)"
            )
            return False
        return True

    def fused_slice(self, m, w):
        """Whether a module named as rows of a fused base tensor went to those rows (halves swapped where the two
        layouts order them differently)."""
        s = self.base.fused_slices.get(m.name)
        if s is None or m.magnitude is not None or m.bias is not None:
            return False
        m = m.transposed() if s.transposed else m
        if tuple(m.shape) != (s.stop - s.start, *self.base.shape(s.tensor)[1:]):
            return False
        p = self.target(s.tensor)
        if any(x.magnitude is not None for x, _ in p.loras):
            self.problems.append(f"{m.name}: shares its tensor with a DoRA module")
        p.slices.append((m.rows(0, m.shape[0], s.swapped), w, s.start))
        return True

    def split_target(self, m, w):
        """Whether an original fused module went, cut into rows, to the diffusers tensors of the base."""
        pieces = self.base.split_slices.get(m.name)
        if not pieces or m.magnitude is not None or m.bias is not None or m.shape[0] != pieces[-1].stop:
            return False
        if not all(self.base.shape(s.tensor)[1:] == tuple(m.shape[1:]) for s in pieces):
            return False
        for s in pieces:
            self.target(s.tensor).loras.append(
                (m.rows(s.start, s.stop, s.swapped, s.tensor[: -len(".weight")]), w)
            )
        return True

    def add_module(self, m, w):
        p = self.target(f"{m.name}.weight")
        if p is None and (self.fused_slice(m, w) or self.split_target(m, w)):
            return
        if p is None:
            return self.unmatched(f"{m.name}.weight", f"{m.name}.weight: not in the base")
        shape = self.base.shape(p.source)
        if tuple(shape) != tuple(m.shape) and not self.widens(m, p, shape):
            return self.problems.append(f"{m.name}.weight: base {list(shape)}, adapter {list(m.shape)}")
        self.check_dora(m, p)
        p.loras.append((m, w))
        if m.bias is not None:
            self.add_bias(m, w)

    def widens(self, m, p, shape):
        """Whether module `m` widens the base weight (zero-padded to its shape, as ComfyUI's reshape_weight does):
        only where it says so, only growing, never a quantized weight."""
        if not m.pads_base or not m.widens(shape):
            return False
        if p.source in self.base.view.quantized:
            self.problems.append(f"{m.name}.weight: a quantized weight cannot be widened to {list(m.shape)}")
            return True
        if p.padded_shape not in (None, tuple(m.shape)):
            self.problems.append(
                f"{m.name}.weight: widened to both {list(p.padded_shape)} and {list(m.shape)}"
            )
        p.padded_shape = tuple(m.shape)
        return True

    def check_dora(self, m, p):
        unmerge = self.options.unmerge
        if m.magnitude is not None and (p.loras or p.slices or unmerge):
            why = "cannot be unmerged (the norm of W + dW is not in the file)" if unmerge else None
            self.problems.append(f"{m.name}: DoRA " + (why or "shares its tensor with another adapter"))
        if p.loras and any(x.magnitude is not None for x, _ in p.loras):
            self.problems.append(f"{m.name}: DoRA shares its tensor with another adapter")

    def add_bias(self, m, w):
        b = self.target(f"{m.name}.bias")
        if b is None:
            self.problems.append(f"{m.name}.bias: the adapter has a bias delta but the base has no bias")
        elif tuple(self.base.shape(b.source)) != tuple(m.bias.shape):
            shape = list(self.base.shape(b.source))
            self.problems.append(f"{m.name}.bias: base {shape}, adapter {list(m.bias.shape)}")
        else:
            b.biases.append((m, w))

    def fitting(self, name, t, what):
        """The plan of the base tensor a full tensor (delta or replacement) goes to, or None (the problem noted)."""
        p = self.target(name)
        if p is None:
            self.unmatched(name, f"{name}: {what} of a tensor not in the base")
        elif what == "replacement" and self.grows_vocabulary(p, t):
            return p
        elif tuple(self.base.shape(p.source)) != tuple(t.shape):
            self.problems.append(f"{name}: base {list(self.base.shape(p.source))}, {what} {list(t.shape)}")
        else:
            return p
        return None

    def grows_vocabulary(self, p, t):
        """Whether a replacement is an embedding or head with tokens added (PEFT modules_to_save after
        resize_token_embeddings): more rows, the same width; the output takes its shape."""
        shape = tuple(self.base.shape(p.source))
        if not (is_embedding(p.name) or p.name == HEAD) or len(shape) != 2 or len(t.shape) != 2:
            return False
        if t.shape[1] != shape[1] or t.shape[0] <= shape[0]:
            return False
        if p.source in self.base.view.quantized:
            self.problems.append(f"{p.name}: a quantized embedding cannot take added tokens")
        p.padded_shape = tuple(t.shape)
        self.grew_from.add(self.label)
        return True

    def add_delta(self, name, t, w):
        p = self.fitting(name, t, "delta")
        if p is not None:
            p.deltas.append((t, w))

    def add_replacement(self, name, t):
        p = self.fitting(name, t, "replacement")
        if p is not None and self.options.unmerge:
            self.problems.append(f"{name}: a full replacement cannot be unmerged")
        elif p is not None and p.replacement is not None:
            self.problems.append(f"{name}: replaced by more than one adapter")
        elif p is not None:
            p.replacement = t

    def add_transform(self, t, w):
        """A multiplicative adapter (IA3, HRA, OFT) on a weight whose input width fits it; weight 1, no unmerge."""
        p = self.target(f"{t.name}.weight")
        if p is None:
            return self.unmatched(f"{t.name}.weight", f"{t.name}.weight: not in the base")
        shape = self.base.shape(p.source)
        if len(shape) < 2 or not transform_fits(t, shape):
            sizes = ", ".join(f"{k} {list(v.shape)}" for k, v in t.tensors.items())
            return self.problems.append(f"{t.name}: {t.kind} ({sizes}) does not fit the base's {list(shape)}")
        if self.options.unmerge or w != 1.0:
            why = "cannot be unmerged here" if self.options.unmerge else f"takes no weight (got {w})"
            return self.problems.append(f"{t.name}: a multiplicative adapter ({t.kind}) {why}")
        p.transforms.append(t)

    def finish(self):
        for p in self.tensors.values():
            others = [m for m, _ in p.loras if tuple(m.shape) != p.padded_shape]
            if p.padded_shape is not None and (others or p.slices or p.deltas or p.transforms):
                self.problems.append(
                    f"{p.name}: widened to {list(p.padded_shape)} by one adapter, changed at another shape by another"
                )
        if self.problems:
            n = len(self.problems)
            shown = "; ".join(self.problems[:6]) + (f"; and {n - 6} more" if n > 6 else "")
            hint = f" ({'; '.join(sorted(self.hints))})" if self.hints else ""
            raise LorakitError(
                f"the adapter does not fit the base ({n} problem{'s' if n > 1 else ''}): {shown}{hint}",
                path=self.base.path,
            )
        untie = self.embed is not None and (HEAD in self.tensors or self.embed in self.tensors)
        if untie and self.same_change(self.tensors.get(HEAD), self.tensors.get(self.embed)):
            del self.tensors[HEAD]  # PEFT's ensure_weight_tying: one change of the one tensor, still tied
            untie = False
        if untie:
            self.target(HEAD)  # write the head explicitly, with or without its own delta
        if len(self.grew_from) > 1:
            raise LorakitError(
                f"{len(self.grew_from)} adapters add tokens ({', '.join(map(str, sorted(self.grew_from)))}): "
                "their tokenizers cannot both be the output's; merge one at a time",
                path=self.base.path,
            )
        return MergePlan(
            self.tensors,
            self.embed if untie else None,
            self.skipped,
            self.elsewhere,
            vocab_size=self.vocabulary(),
            tokenizer_from=next(iter(self.grew_from), None),
            notes=self.notes,
        )

    def same_change(self, head, embed):
        """Whether a tied head and its embedding change alike (PEFT's ensure_weight_tying ties their LoRAs or
        their modules_to_save copies): then the output stays tied. Exact up to fp64 rounding of the factors."""
        if head is None or embed is None or head.biases or embed.biases or head.slices or embed.slices:
            return False
        if head.deltas or embed.deltas or head.transforms or embed.transforms:
            return False
        if (head.replacement is None) != (embed.replacement is None):
            return False
        if head.replacement is not None and not torch.equal(head.replacement, embed.replacement):
            return False
        if not head.loras and not embed.loras:
            return head.replacement is not None
        if (
            not head.loras
            or not embed.loras
            or any(m.magnitude is not None for m, _ in head.loras + embed.loras)
        ):
            return False
        B, A = weighted_stack([*head.loras, *[(m, -w) for m, w in embed.loras]])
        scale = frobenius_norm(*weighted_stack(head.loras))
        return frobenius_norm(B, A) <= 1e-9 * scale

    def vocabulary(self):
        """The output's vocabulary where added tokens grow the embedding and the head (both, to the same rows), or
        None; refused where they would disagree."""
        grown = {
            n: p.padded_shape[0]
            for n, p in self.tensors.items()
            if p.padded_shape and p.replacement is not None
        }
        if not grown:
            return None
        rows = {
            n: grown.get(n, self.base.shape(n if n in self.base else self.embed)[0])
            for n in self.vocab_tensors()
        }
        if len(set(rows.values())) > 1:
            shown = ", ".join(f"{n} {r}" for n, r in sorted(rows.items()))
            raise LorakitError(
                f"added tokens grow some vocabulary tensors and not others ({shown} rows): the adapter must "
                "save every one that grew (modules_to_save embed_tokens and lm_head)",
                path=self.base.path,
            )
        return next(iter(rows.values()))

    def vocab_tensors(self):
        """The base's embedding and head tensors (a tied head counts as written once untied)."""
        names = [n for n in self.base.shapes() if is_embedding(n) or n == HEAD]
        return names + ([HEAD] if HEAD in self.tensors and HEAD not in names else [])


def transform_fits(t, shape):
    """Whether a multiplicative module fits a base weight [out, in, *kernel] (conv: its input width in x kernel)."""
    out, inp = shape[0], math.prod(shape[1:])
    if t.kind == "ia3":
        kernel = (1,) * (len(shape) - 2)
        return tuple(t.tensors["ia3_l"].shape) in ((out, 1, *kernel), (1, shape[1], *kernel))
    if t.kind == "hra":
        return t.tensors["hra_u"].shape[0] == inp
    if t.kind == "boft":
        R, s = t.tensors["boft_R"], t.tensors["boft_s"]
        return R.shape[1] * R.shape[2] == inp and tuple(s.shape) == (out, 1)
    blocks, block = t.tensors["oft_R"].shape[0], t.options["block_size"]
    return inp % block == 0 and (blocks == 1 or blocks * block == inp)


def on_rows(m, tensor, start, stop, rows):
    """Module `m` as a delta of the whole fused `tensor`: B padded with zero rows outside [start, stop) (exact)."""
    B = m.B.new_zeros((rows, *m.B.shape[1:]))
    B[start:stop] = m.B
    return Module(tensor.removesuffix(".weight"), m.A, B, m.alpha, m.kind)
