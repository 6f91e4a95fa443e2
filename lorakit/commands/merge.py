"""`lorakit merge`: adapters into a base checkpoint, streamed tensor by tensor with bounded memory.

Plan first (every adapter tensor must land on a base tensor of the right shape; nothing is written otherwise), then
write each output shard: header computed up front, tensors produced by a thread pool in file order and appended by
the main thread. Untouched tensors are copied byte for byte. Memory: a few tensors in fp32, whatever the model size.
"""
import json
import os
import re
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..checkpoint import INDEX, Checkpoint, read_config
from ..dtypes import st_dtype, torch_dtype, user_dtype
from ..errors import LorakitError
from ..formats import load
from ..io import BufferPool, ShardWriter, atomic_output, spec_nbytes
from ..spec import fingerprint
from .algebra import parse_weighted

EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD = "lm_head.weight"


@dataclass
class TensorPlan:
    """What to do with one output tensor: its source tensor in the base, and what the adapters add to it."""
    name: str
    source: str  # base tensor read (differs from name only for an untied lm_head)
    loras: list = field(default_factory=list)  # [(Module, weight)]
    biases: list = field(default_factory=list)  # [(Module, weight)]
    replacement: torch.Tensor = None

    @property
    def touched(self):
        return bool(self.loras or self.biases) or self.replacement is not None


def parse_size(text):
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not m:
        raise LorakitError(f"cannot read shard size '{text}' (e.g. 5GB, 500MB, 2GiB)")
    power = "KMGT".find(m.group(2)) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


BLOCK_ELEMENTS = 1 << 19  # fp32 row blocks of ~2 MB stay in cache: 2-3x faster than whole-tensor passes


def merge_tensor(W, plan, sign, out_dtype, out=None):
    """The per-tensor path: read -> (dequantize) -> add delta -> (quantize) -> cast. W is the base tensor as stored;
    every addition is in fp32 and the result is rounded once to `out_dtype` (into `out` when given)."""
    if plan.replacement is not None:  # the spec: a replacement first, then the deltas on top of it
        W = plan.replacement
        if not plan.loras and not plan.biases:
            return W.to(out_dtype)
    if plan.biases or any(m.magnitude is not None for m, _ in plan.loras):
        Wf = W.float() if W.dtype != torch.float32 else W.clone()
        for m, w in plan.loras:
            Wf = m.apply(Wf, sign=sign, weight=w)  # DoRA needs the whole tensor for its norm; it is alone here (see plan)
        for m, w in plan.biases:
            Wf.add_(m.bias.float(), alpha=sign * w)
        return Wf.to(out_dtype)
    factors = [(*m.factors(torch.float32), sign * w) for m, w in plan.loras]
    W2 = W.reshape(W.shape[0], -1)
    out = torch.empty(W2.shape, dtype=out_dtype) if out is None else out.reshape(W2.shape)
    rows = max(1, BLOCK_ELEMENTS // max(1, W2.shape[1]))
    for i in range(0, W2.shape[0], rows):
        block = W2[i:i + rows].to(torch.float32, copy=True)
        for B2, A2, alpha in factors:
            block.addmm_(B2[i:i + rows], A2, alpha=alpha)
        out[i:i + rows] = block
    return out.reshape(W.shape)


def plan_merge(view, adapters, unmerge, tied, ignore_fingerprint):
    """Resolve every adapter tensor to a base tensor of the WeightView `view` (quantized weights by their
    dequantized shapes). Raises one error listing everything that does not fit."""
    ckpt = view.ckpt
    qshapes = {n: view.shape(n) for n in view.quantized}
    plans = {}
    problems = []
    embed = next((n for n in ckpt.where if n.endswith(EMBEDDING_NAMES)), None) if tied else None
    # the fingerprint sees a quantized base as its full-precision weights, so adapters for the original fit
    base_fp = fingerprint(view.shapes())

    def target(name):
        if name in ckpt or name in qshapes:
            return plans.setdefault(name, TensorPlan(name, name))
        if name == HEAD and embed is not None:  # tied head, stored only as the embedding
            return plans.setdefault(name, TensorPlan(name, embed))
        return None

    for path, ad, w in adapters:
        if ad.base_fingerprint and ad.base_fingerprint != base_fp and not ignore_fingerprint:
            problems.append(f"{path} was made for another base (fingerprint {ad.base_fingerprint[:15]}... != "
                            f"{base_fp[:15]}...; --ignore-fingerprint to merge anyway)")
        for m in ad.modules.values():
            p = target(f"{m.name}.weight")
            if p is None:
                problems.append(f"{m.name}.weight: not in the base")
                continue
            shape = qshapes.get(p.source) or ckpt.entry(p.source).shape
            if tuple(shape) != tuple(m.shape):
                problems.append(f"{m.name}.weight: base {list(shape)}, adapter {list(m.shape)}")
                continue
            if m.magnitude is not None and (p.loras or unmerge):
                problems.append(f"{m.name}: DoRA " + ("cannot be unmerged (the norm of W + dW is not in the file)"
                                                      if unmerge else "shares its tensor with another adapter"))
            if p.loras and any(x.magnitude is not None for x, _ in p.loras):
                problems.append(f"{m.name}: DoRA shares its tensor with another adapter")
            p.loras.append((m, w))
            if m.bias is not None:
                b = target(f"{m.name}.bias")
                if b is None:
                    problems.append(f"{m.name}.bias: the adapter has a bias delta but the base has no bias")
                elif tuple(ckpt.entry(b.source).shape) != tuple(m.bias.shape):
                    problems.append(f"{m.name}.bias: base {list(ckpt.entry(b.source).shape)}, "
                                    f"adapter {list(m.bias.shape)}")
                else:
                    b.biases.append((m, w))
        for name, t in ad.replacements.items():
            p = target(name)
            if p is None or tuple(ckpt.entry(p.source).shape) != tuple(t.shape):
                problems.append(f"{name}: replacement does not fit the base")
            elif unmerge:
                problems.append(f"{name}: a full replacement cannot be unmerged")
            elif p.replacement is not None:
                problems.append(f"{name}: replaced by more than one adapter")
            else:
                p.replacement = t
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise LorakitError(f"{len(problems)} adapter tensor(s) do not fit the base: {shown}", path=ckpt.path)
    untie = embed is not None and (HEAD in plans or embed in plans)
    if untie:
        target(HEAD)  # write the head explicitly, with or without its own delta
    return plans, embed if untie else None


def _layout(ckpt, untie_embed, shard_size, spec_of, rename=None):
    """Output shards: [(file name, [(tensor name, dtype, shape)])], in the base's order. `rename` maps a shard's
    tensor names to the output's (dequantized modules replace their packed tensors by one weight)."""
    order = []
    for file in ckpt.files:
        names = list(ckpt.shards[file].header.entries)
        if untie_embed is not None and untie_embed in names:
            names.insert(names.index(untie_embed) + 1, HEAD)
        order.append((os.path.basename(file), rename(names) if rename else names))
    if shard_size is None:
        return [(f, [spec_of(n) for n in names]) for f, names in order]
    shards, current, size = [], [], 0
    for _, names in order:
        for spec in map(spec_of, names):
            nbytes = spec_nbytes(spec)
            if current and size + nbytes > shard_size:
                shards.append(current)
                current, size = [], 0
            current.append(spec)
            size += nbytes
    shards.append(current)
    n = len(shards)
    if n == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


def merge(base, adapters, output, dtype="keep", unmerge=False, shard_size=None, threads=None, force=False,
          quiet=False, ignore_fingerprint=False, strategy="feedback", full_precision_base=None, onto="dequantized",
          seed=0):
    """Merge adapters (`path` or `path:weight`) into `base`: W' = W + sum_i w_i * scale_i * B_i @ A_i, in fp32,
    rounded once. Writes `output` in the base's layout (file or folder). Quantized bases (FP8, INT8, GPTQ, AWQ,
    NF4) are written back in their format with `strategy` (see lorakit.requant), or dequantized with `dtype`; the
    report then says how much of each adapter module survived. Returns a report."""
    from .. import quant, requant
    _large_buffers_back_to_os()
    base = os.fspath(base)
    view = quant.WeightView(base)  # quantized modules seen as their full-precision weights
    ckpt, handler, qweights, member_of = view.ckpt, view.handler, view.quantized, view.member_of
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    if strategy not in requant.STRATEGIES:
        raise LorakitError(f"unknown strategy '{strategy}' (choose from {', '.join(requant.STRATEGIES)})")
    if onto not in ("dequantized", "original"):
        raise LorakitError(f"--onto is 'dequantized' or 'original', not '{onto}'")
    loaded = [(p, load(p), w) for p, w in map(parse_weighted, adapters)]
    config = read_config(base)
    tied = bool(config and config.get("tie_word_embeddings"))
    qshapes = {n: view.shape(n) for n in qweights}
    plans, untie_embed = plan_merge(view, loaded, unmerge, tied, ignore_fingerprint)
    target_dtype = user_dtype(dtype) if dtype not in (None, "keep") else None
    dequantize_out = bool(qweights) and target_dtype is not None
    full = Checkpoint(full_precision_base) if full_precision_base else None
    if qweights and not dequantize_out:
        if not handler.writable:
            raise LorakitError(f"{handler.name} checkpoints are read only: merge to full precision with --dtype bf16",
                               path=base)
        if (strategy == "original" or onto == "original") and full is None:
            raise LorakitError("--strategy original and --onto original need --full-precision-base", path=base)

    def stored(name):
        return ckpt.entry(plans[name].source if name in plans else name)

    def spec_of(name):
        if dequantize_out and name in qweights:  # a dequantized module: one full-precision weight
            return (name, st_dtype(target_dtype), qshapes[name])
        e = stored(name)
        keep = target_dtype is None or not torch_dtype(e.dtype).is_floating_point or name in member_of
        return (name, e.dtype if keep else st_dtype(target_dtype), e.shape)

    def rename(names):
        """Dequantized output: a module's packed tensors become `<module>.weight`, where its first one stood."""
        out, done = [], set()
        for n in names:
            key = member_of.get(n)
            if key is None:
                out.append(n)
            elif key not in done:
                done.add(key)
                out.append(key)
        return out

    shard_bytes = parse_size(shard_size)
    folder_out = os.path.isdir(base) or shard_bytes is not None
    layout = _layout(ckpt, untie_embed, shard_bytes, spec_of, rename if dequantize_out else None)
    sign = -1.0 if unmerge else 1.0
    threads = threads or min(4, os.cpu_count() or 1)
    total = sum(spec_nbytes(spec) for _, specs in layout for spec in specs)
    survival, cache, lock = {}, {}, threading.Lock()

    def quantized(key):
        """All output tensors of one quantized module, computed once (its tensors are written one by one)."""
        with lock:
            entry = cache.setdefault(key, {"lock": threading.Lock(), "out": None})
        with entry["lock"]:
            if entry["out"] is None:
                members, plan = qweights[key], plans.get(key)
                loras = plan.loras if plan else []
                if dequantize_out:
                    W = handler.dequantize(ckpt, members)
                    if loras:
                        T, _, _ = requant.merged_target(W, loras, sign, _full(full, key, onto))
                        W = T
                    entry["out"] = {key: W.to(target_dtype)}
                else:
                    out, row = requant.requantize(handler, ckpt, members, loras, sign,
                                                  strategy, _full(full, key, onto if strategy != "original"
                                                                  else "original"), seed)
                    survival[key[: -len(".weight")]] = row
                    entry["out"] = out
            return entry["out"]

    # buffers for the tensors in flight (read: being computed; out: computed, waiting to be written), reused
    def copied(name):  # written byte for byte from the base, never in memory
        plan = plans.get(name)
        return (plan is None or not plan.touched) and name in ckpt and spec_of(name)[1] == ckpt.entry(name).dtype

    computed = [n for _, specs in layout for n, _, _ in specs
                if n not in member_of and n not in qweights and not copied(n)]
    largest = max([stored(n).nbytes for n in computed] + [spec_nbytes(spec_of(n)) for n in computed] + [0])
    read_pool, out_pool = BufferPool(largest), BufferPool(largest)

    def produce(name):
        """(tensor, function giving its buffer back once written, or None), or None for a byte-identical copy."""
        if name in qweights or name in member_of:
            key = name if name in qweights else member_of[name]
            plan = plans.get(key)
            if not dequantize_out and (plan is None or not plan.touched):
                return None  # an untouched quantized module: byte-identical
            t = quantized(key).pop(name, None)  # popped: a module's outputs leave memory as they are written
            return None if t is None else (t, None)  # members the strategy leaves alone (g_idx) are copied
        if copied(name):
            return None  # byte-identical copy, done by the writer
        plan = plans.get(name)
        source = plan.source if plan else name
        spec = spec_of(name)
        rbuf = read_pool.get()
        W = ckpt.shards[ckpt.where[source]].read(source, rbuf)
        if plan is not None and plan.touched and spec[1] == ckpt.entry(source).dtype:
            out = merge_tensor(W, plan, sign, W.dtype, out=W)  # in place: each row block is read before written
            if out.data_ptr() == W.data_ptr():
                return out, lambda: read_pool.put(rbuf)
            read_pool.put(rbuf)  # a path that made its own tensor (DoRA, bias, replacement)
            return out, None
        obuf = out_pool.get()
        out = out_pool.tensor(obuf, torch_dtype(spec[1]), spec[2])
        if plan is None or not plan.touched:
            out.copy_(W)
        else:
            out = merge_tensor(W, plan, sign, out.dtype, out)
        read_pool.put(rbuf)
        return out, lambda: out_pool.put(obuf)

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)  # the parallelism is the worker threads: intra-op threads on top only oversubscribe
    with atomic_output(output, force=force, directory=folder_out) as tmp, \
            tqdm(total=total, desc="merge", unit="B", unit_scale=True, disable=quiet) as bar, \
            ThreadPoolExecutor(threads) as pool:
        weight_map = {}
        try:
            for file_name, specs in layout:
                meta = _shard_metadata(ckpt, file_name)
                dest = os.path.join(tmp, file_name) if folder_out else tmp
                writer = ShardWriter(dest, specs, meta, direct=True)
                pending = deque()

                def drain(limit):
                    while len(pending) > limit:
                        spec, fut = pending.popleft()
                        result = fut.result()
                        if result is None:
                            writer.copy(spec[0], ckpt.shards[ckpt.where[spec[0]]])
                        else:
                            writer.write(spec[0], result[0])
                            if result[1] is not None:
                                result[1]()  # its buffer back to the pool
                        bar.update(spec_nbytes(spec))

                for spec in specs:
                    pending.append((spec, pool.submit(produce, spec[0])))
                    weight_map[spec[0]] = file_name
                    drain(threads)  # bounded look-ahead: at most 2 x threads tensors in memory
                drain(0)
                writer.close()
            if folder_out:
                _write_folder_files(base, tmp, weight_map, total, target_dtype, untie_embed,
                                    write_index=len(layout) > 1 or ckpt.index is not None,
                                    drop_quantization=dequantize_out)
        except OSError as e:
            raise LorakitError(f"cannot write the output: {e.strerror or e}", path=output) from None
        finally:
            torch.set_num_threads(intra_op)
    notes = []
    if untie_embed:
        notes.append(f"tied embeddings: the adapter changes {untie_embed} / {HEAD}; both were written and "
                     "tie_word_embeddings set to false in config.json")
    touched = [p for p in plans.values() if p.touched]
    report = {"output": os.fspath(output), "base": base, "adapters": [{"file": p, "weight": w} for p, _, w in loaded],
              "unmerge": unmerge, "tensors": sum(len(s) for _, s in layout), "merged": len(touched),
              "shards": len(layout) if folder_out else 1, "bytes": total, "dtype": dtype or "keep", "notes": notes}
    if qweights:
        report["quantization"] = _survival_summary(handler, strategy, survival, dequantize_out, notes)
    return report


def _large_buffers_back_to_os():
    """glibc keeps freed tensor-sized buffers in its heap once its mmap threshold has adapted upwards, so peak RSS
    grows with the number of tensors seen. A fixed 8 MiB threshold gives tensor-sized buffers back when freed (the
    tensors in flight live in BufferPools anyway) while the 2 MB fp32 row blocks stay in the heap, reused without
    page faults."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _full(full, key, onto):
    """The full-precision weight when merging onto the original, else None (merge onto the dequantized weight)."""
    if onto != "original" or full is None:
        return None
    if key not in full:
        raise LorakitError("the full-precision base has no such tensor", path=full.path, tensor=key)
    return full.get(key).float()


def _survival_summary(handler, strategy, rows, dequantized, notes):
    summary = {"format": handler.name, "strategy": "dequantized (--dtype)" if dequantized else strategy,
               "modules": {k: rows[k] for k in sorted(rows)}}
    if rows:
        for key in ("retention", "noise", "codes_changed", "probe_error_random", "probe_error_aligned"):
            summary[f"mean_{key}"] = sum(r[key] for r in rows.values()) / len(rows)
        if summary["mean_retention"] < 0.5:
            notes.append(f"WARNING: only {100 * summary['mean_retention']:.0f}% of the adapter survived requantization "
                         f"to {handler.name} with --strategy {strategy}. Better here: --strategy feedback (default), "
                         "--strategy original with --full-precision-base, or a full-precision output with --dtype bf16")
    return summary


def _shard_metadata(ckpt, file_name):
    for file in ckpt.files:
        if os.path.basename(file) == file_name:
            return ckpt.shards[file].header.metadata or {"format": "pt"}
    return {"format": "pt"}


def _write_folder_files(base, tmp, weight_map, total, target_dtype, untie_embed, write_index, drop_quantization):
    """Copy the folder's other files; rewrite the index and, where needed, config.json (a dequantized output loses
    its quantization_config and quantize_config.json)."""
    if os.path.isdir(base):
        for entry in os.listdir(base):
            src = os.path.join(base, entry)
            if entry.endswith(".safetensors") or entry == INDEX or entry.startswith("."):
                continue
            if drop_quantization and entry == "quantize_config.json":
                continue
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, entry))
            else:
                shutil.copy2(src, os.path.join(tmp, entry))
    if write_index:
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
            f.write("\n")
    config_path = os.path.join(tmp, "config.json")
    if os.path.isfile(config_path) and (target_dtype is not None or untie_embed):
        with open(config_path) as f:
            config = json.load(f)
        if drop_quantization:
            config.pop("quantization_config", None)
        if target_dtype is not None:
            key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
            config[key] = str(target_dtype).replace("torch.", "")
        if untie_embed:
            config["tie_word_embeddings"] = False
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
