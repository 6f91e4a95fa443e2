"""The merge pipeline: a pool of worker threads produces the output tensors in file order (merged, requantized or
copied), and the main thread hands them to a Writer, with a bounded look-ahead so that memory holds a few tensors
whatever the model size.

A Writer is the output format: `shards` lists [(file name, [(tensor name, dtype, shape)])] in write order
and `total` their bytes; `folder` whether the output is a folder; `open_shard(path, index, specs)` returns an object
with `write(name, tensor)`, `copy(name, source)` (the stored bytes of `name` in the base) and `close()`;
`source_file(index)` is the base file output file `index` copies whole when nothing in it changes (or None);
`finish(folder, paths, weight_map, total)` writes what goes beside the tensors. The files go through an
io.Staging (journal, parts, publication).
Each base kind brings its Writer (lorakit.bases).
"""

import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from ..devices import pick_device
from ..options import MERGE_DEVICES
from ..errors import LorakitError
from ..io import BufferPool, DirectFile, copy_file, spec_nbytes
from ..io.heap import retained_heap
from ..io.dtypes import st_dtype, torch_dtype, user_dtype
from ..quant import requant
from .tensor import check_finite, merge_tensor

FULL_PRECISION = ("F64", "F32", "F16", "BF16")
LOOKAHEAD = 8  # tensors queued per thread at most, byte copies included
BLOCK_BYTES = 2 << 20  # a worker's fp32 row block (engine.tensor.BLOCK_ELEMENTS x 4)
DIRECT_STAGING = DirectFile.DEPTH * DirectFile.CHUNK  # the O_DIRECT writer's staging buffers


class MergeJob:
    """What each output tensor is and how it is produced: a byte copy, a full-precision merge, or one tensor of a
    requantized (or dequantized) module."""

    def __init__(self, base, plan, options, full=None, inputs=None):
        """`options.dtype` converts every full-precision tensor and writes every quantized module in it; where the
        base has quantized modules no codec writes back (base.uncodec_modules: a GGUF's IQ* tensors), only those are
        written in it and every other tensor keeps its type. `full`: the --full-precision-base checkpoint. `inputs`:
        {weight name: InputMoments} of the layers' inputs on calibration data (for gptq)."""
        view = base.view
        self.inputs = inputs or {}
        self.view, self.ckpt, self.plans = view, view.ckpt, plan.tensors
        self.vocab_size, self.tokenizer_from = plan.vocab_size, plan.tokenizer_from  # added tokens (PEFT)
        self.sign = -1.0 if options.unmerge else 1.0
        self.target_dtype = user_dtype(options.dtype) if options.dtype not in (None, "keep") else None
        dequantize = base.uncodec_modules(self.plans, self.target_dtype)
        self.convert_floats = self.target_dtype is not None and dequantize is None
        self.dequantized = set(view.quantized) if self.convert_floats else set(dequantize or ())
        # the whole output is full precision
        self.dequantize_out = bool(view.quantized) and self.convert_floats
        self.requantizes = any(k not in self.dequantized for k in view.quantized)
        self.strategy, self.full, self.onto, self.seed = options.strategy, full, options.onto, options.seed
        self.device = pick_device(options.device, MERGE_DEVICES)
        self.survival = {}
        # whether the adapters' modules err together when dropped (a trained adapter): auto weighs it
        self.coherence = (
            requant.coherence([(m.name, m.B) for p in self.plans.values() for m, *_ in (*p.loras, *p.slices)])
            if self.requantizes and self.strategy == "auto"
            else None
        )
        # buffers of the full-precision tensors in flight (read: being computed; out: computed, waiting to be
        # written), each sized for its tensor and reused
        self.read_pool, self.out_pool = BufferPool(), BufferPool()

    def source(self, name):
        return self.plans[name].source if name in self.plans else name

    def spec_of(self, name):
        """(name, safetensors dtype, shape) of an output tensor."""
        if name in self.dequantized:  # a dequantized module: one full-precision weight
            return (name, st_dtype(self.target_dtype), self.view.shape(name))
        e = self.ckpt.entry(self.source(name))
        padded = self.plans[name].padded_shape if name in self.plans else None
        if padded is not None:  # a widened weight (Module.pads_base)
            return (name, st_dtype(self.target_dtype) if self.convert_floats else e.dtype, list(padded))
        # --dtype converts the full-precision floats; 8-bit floats are stored codes or scales, kept as they are
        keep = not self.convert_floats or e.dtype not in FULL_PRECISION or name in self.view.member_of
        return (name, e.dtype, e.shape, e.nbytes) if keep else (name, st_dtype(self.target_dtype), e.shape)

    def worker_bytes(self):
        """What one worker holds at most: the largest full-precision tensor it merges (read, and written where the
        dtype changes) or quantized module it requantizes (fp32 weight, target and codes)."""
        largest = 0
        for name, plan in self.plans.items():
            if not plan.touched and name not in self.dequantized:
                continue
            key = self.module_of(plan.source)
            if key is not None:
                rows, cols = self.view.module_shape(key)
                largest = max(largest, 3 * 4 * rows * cols)
            elif plan.source in self.ckpt:
                largest = max(largest, 2 * self.ckpt.entry(plan.source).nbytes)
        return largest + 2 * BLOCK_BYTES

    def shared_bytes(self):
        """What the workers share, whatever their number: the adapters' factors in memory, the writer's staging."""
        factors = sum(
            m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size()
            for plan in self.plans.values()
            for m, _ in plan.loras
        )
        return factors + DIRECT_STAGING

    def output_names(self, names):
        """A shard's tensor names as written: in a dequantized output a module's packed tensors become
        `<module>.weight`, where its first one stood."""
        if not self.dequantized:
            return names
        out, done = [], set()
        for n in names:
            key = self.view.member_of.get(n)
            if key is None or key not in self.dequantized:
                out.append(n)
            elif key not in done:
                done.add(key)
                out.append(key)
        return out

    def module_of(self, name):
        """The quantized module `name` is (or is a stored tensor of), or None."""
        return name if name in self.view.quantized else self.view.member_of.get(name)

    def computed_module(self, key):
        """Whether a quantized module's outputs are computed (dequantized, or requantized with a delta), not copied."""
        plan = self.plans.get(key)
        return key in self.dequantized or (plan is not None and plan.touched)

    def work_unit(self, name):
        """What producing `name` computes: its quantized module (all members come from one computation), the tensor
        itself, or None for a byte copy. The look-ahead keeps `threads` of these in flight."""
        key = self.module_of(name)
        if key is not None:
            return key if self.computed_module(key) else None
        return None if self.copied(name) else name

    def copied(self, name):
        """Written byte for byte from the base, never in memory."""
        plan = self.plans.get(name)
        return (
            (plan is None or not plan.touched)
            and name in self.ckpt
            and self.spec_of(name)[1] == self.ckpt.entry(name).dtype
        )

    def produce(self, name):
        """(tensor, function giving its buffer back once written, or None), or None for a byte-identical copy: a
        tensor that is not part of a computed quantized module (those come from module_outputs)."""
        if self.copied(name):
            return None
        plan, source, spec = self.plans.get(name), self.source(name), self.spec_of(name)
        rbuf = self.read_pool.get(self.ckpt.entry(source).nbytes)
        W = self.ckpt.shards[self.ckpt.where[source]].read(source, rbuf)
        if plan is not None and plan.padded_shape is not None:  # zero rows / columns first, as ComfyUI pads
            W = torch.nn.functional.pad(
                W, [p for d in reversed(range(W.ndim)) for p in (0, plan.padded_shape[d] - W.shape[d])]
            )
        if plan is not None and plan.touched and spec[1] == self.ckpt.entry(source).dtype:
            out = merge_tensor(W, plan, self.sign, W.dtype, out=W, device=self.device)  # in place
            if out.data_ptr() == W.data_ptr():
                return out, lambda: self.read_pool.put(rbuf)
            self.read_pool.put(rbuf)  # a path that made its own tensor (DoRA, bias, replacement)
            return out, None
        obuf = self.out_pool.get(spec_nbytes(spec))
        out = self.out_pool.tensor(obuf, torch_dtype(spec[1]), spec[2])
        if plan is None or not plan.touched:
            check_finite(name, out.copy_(W))  # a cast to another dtype can overflow
        else:
            out = merge_tensor(W, plan, self.sign, out.dtype, out, self.device)
        self.read_pool.put(rbuf)
        return out, lambda: self.out_pool.put(obuf)

    def module_outputs(self, key):
        """All output tensors of one computed quantized module {name: tensor}, checked: one computation, whose
        tensors are then taken one by one as they are written."""
        view, plan = self.view, self.plans.get(key)
        members = view.quantized[key]
        # slices padded: the grid needs whole rows
        loras = plan.all_loras(view.module_shape(key)[0]) if plan else []
        if plan is not None and plan.transforms and key not in self.dequantized:
            raise LorakitError(
                "a multiplicative adapter (IA3, HRA, OFT) into a quantized module is not supported: merge with "
                "--dtype",
                tensor=key,
            )
        if plan is not None and plan.deltas and key not in self.dequantized:
            raise LorakitError(
                "a full-tensor delta into a quantized module is not supported: merge with --dtype", tensor=key
            )
        if key in self.dequantized:
            W = view.handler.dequantize(self.ckpt, members)
            for t in plan.transforms if plan else []:
                W = t.apply(W)
            if loras:
                W = requant.merged_target(W, loras, self.sign, self._full(key, self.onto))
            for D, w in plan.deltas if plan else []:
                W = W + D.float() * (self.sign * w)
            out = {key: view.handler.to_full(self.ckpt, members, W).to(self.target_dtype)}
        else:
            strategy = self.strategy
            onto = "original" if strategy == "original" else self.onto
            out, row = requant.requantize(
                view.handler,
                self.ckpt,
                members,
                loras,
                self.sign,
                strategy,
                self._full(key, onto),
                self.seed,
                self.inputs.get(key),
                self.coherence.bias_weight if self.coherence else 1.0,
            )
            self.survival[key.removesuffix(".weight")] = row
        for name, t in out.items():
            if key in self.dequantized or t.element_size() > 1:  # requantize checked the codes' values itself
                check_finite(name, t)
        return out

    def _full(self, key, onto):
        """The full-precision weight when merging onto the original, else None (onto the dequantized weight)."""
        if onto != "original" or self.full is None:
            return None
        if key not in self.full:
            raise LorakitError("the full-precision base has no such tensor", path=self.full.path, tensor=key)
        return self.full.get(key).float()


def member(future, name):
    """One output tensor of a computed quantized module, popped (it leaves memory once written), or None for members
    the strategy leaves alone (g_idx: copied)."""
    t = future.result().pop(name, None)
    return None if t is None else (t, None)


def run(job, writer, staging, threads, bar):
    """Produce the output files `staging.todo` of `writer.shards` with `threads` workers, each file written in order
    and handed to `staging.done` once complete; a file nothing changes is copied whole by the kernel."""
    intra_op = torch.get_num_threads()
    # the parallelism is the worker threads: intra-op threads on top only oversubscribe
    torch.set_num_threads(1)
    try:
        with retained_heap(job.requantizes), ThreadPoolExecutor(threads) as pool:
            # quantized module -> the future of its outputs: one worker computes it (its members may lie in
            # several files), and no worker waits for another
            modules = {}
            for index, (file_name, specs) in enumerate(writer.shards):
                if file_name not in staging.todo:
                    continue
                path, source = staging.path(file_name), writer.source_file(index)
                if source is not None and all(job.work_unit(spec[0]) is None for spec in specs):
                    copy_file(source, path)
                    bar.update(sum(map(spec_nbytes, specs)))
                    staging.done(file_name, copy_of=source)
                else:
                    shard = writer.open_shard(path, index, specs)
                    write_file(job, shard, specs, pool, modules, threads, bar)
                    staging.done(file_name, crc32=shard.crc32)
    finally:
        torch.set_num_threads(intra_op)


def write_file(job, shard, specs, pool, modules, threads, bar):
    """One output file's tensors, produced by the pool with a bounded look-ahead, written in order."""
    pending = deque()

    def drain(limit):
        while len(pending) > limit * LOOKAHEAD or len({u for _, _, u in pending if u}) > limit:
            spec, take, _ = pending.popleft()
            result = take()
            if result is None:
                shard.copy(spec[0], job.ckpt.shards[job.ckpt.where[spec[0]]])
            else:
                shard.write(spec[0], result[0])
                if result[1] is not None:
                    result[1]()  # its buffer back to the pool
            bar.update(spec_nbytes(spec))

    for spec in specs:
        name, unit = spec[0], job.work_unit(spec[0])
        key = job.module_of(name)
        if unit is not None and unit == key:
            if key not in modules:
                modules[key] = pool.submit(job.module_outputs, key)
            pending.append((spec, functools.partial(member, modules[key], name), unit))
        else:
            pending.append((spec, pool.submit(job.produce, name).result, unit))
        drain(threads)  # bounded look-ahead: `threads` pieces of work (and their memory) in flight
    drain(0)
    shard.close()
