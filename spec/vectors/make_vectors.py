"""Regenerate the conformance vectors and manifest.json (deterministic: same bytes every run).

python spec/vectors/make_vectors.py [OUT_DIR]
"""

import json
import os
import struct

import torch

from lorakit.core import Adapter, Module
from lorakit.formats.lorakit_v1 import to_tensors
from lorakit.io import build_header, tensor_bytes

PROVENANCE = {
    "tool": "lorakit conformance vectors",
    "created": "2026-01-01T00:00:00Z",
    "operation": "example",
}


def adapter(**kw):
    g = torch.Generator().manual_seed(0)
    ad = Adapter(base_model="lorakit/vectors", provenance=dict(PROVENANCE))
    ad.add(
        Module("layers.0.q_proj", torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), alpha=8.0)
    )
    for k, v in kw.items():
        setattr(ad, k, v)
    return ad


def file_bytes(tensors, meta):
    items = sorted(tensors.items())
    return build_header([(k, _st(v.dtype), tuple(v.shape)) for k, v in items], meta) + b"".join(
        tensor_bytes(v) for _, v in items
    )


def _st(dtype):
    from lorakit.io.dtypes import st_dtype

    return st_dtype(dtype)


def edited(tensors, meta, edit_t=None, edit_m=None):
    """Copies of a file's (tensors, metadata), each edited in place by its function when given."""
    t, m = dict(tensors), dict(meta)
    if edit_t:
        edit_t(t)
    if edit_m:
        edit_m(m)
    return t, m


def raw_file(header, data=b""):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def vectors():
    g = torch.Generator().manual_seed(1)
    base_t, base_m = to_tensors(adapter())
    out = {}

    def add(name, expect, description, tensors=None, meta=None, raw=None):
        out[name] = (expect, description, raw if raw is not None else file_bytes(tensors, meta))

    def variant(edit_t=None, edit_m=None):
        return edited(base_t, base_m, edit_t, edit_m)

    add("valid_linear.safetensors", "valid", "one linear module, fp32", *variant())
    for dt in (torch.float16, torch.bfloat16):
        name = str(dt).split(".")[1]
        add(
            f"valid_{name}.safetensors",
            "valid",
            f"factors in {name}",
            *variant(lambda t: t.update({k: v.to(dt) for k, v in t.items() if "lora_" in k})),
        )
    ad = Adapter(provenance=dict(PROVENANCE))
    ad.add(
        Module(
            "unet.conv_in", torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g), 2.0
        )
    )
    ad.add(
        Module(
            "model.embed_tokens",
            torch.randn(3, 8, generator=g),
            torch.randn(32, 3, generator=g),
            6.0,
            kind="embedding",
        )
    )
    ad.add(
        Module(
            "h.0.attn.c_attn",
            torch.randn(2, 24, generator=g),
            torch.randn(8, 2, generator=g),
            2.0,
            kind="linear_t",
        )
    )
    ad.add(
        Module(
            "layers.0.v_proj",
            torch.randn(8, 16, generator=g),
            torch.randn(8, 8, generator=g),
            16.0,
            bias=torch.randn(8, generator=g),
            magnitude=torch.rand(8, generator=g) + 0.5,
            dora_axis=0,
        )
    )
    ad.replacements["score.weight"] = torch.randn(2, 16, generator=g)
    add(
        "valid_all_kinds.safetensors",
        "valid",
        "conv, embedding, linear_t, DoRA + bias delta, a replacement, mixed ranks",
        *to_tensors(ad),
    )
    add(
        "valid_base_identity.safetensors",
        "valid",
        "spec 1.1: base fingerprint and base identity recorded",
        *variant(
            edit_m=lambda m: m.update(
                {
                    "lorakit.base_fingerprint": "sha256:" + "ab" * 32,
                    "lorakit.base_identity": "sha256:" + "cd" * 32,
                }
            )
        ),
    )
    add(
        "invalid_base_identity.safetensors",
        "LK104",
        "base identity that is not sha256:<64 hex>",
        *variant(edit_m=lambda m: m.update({"lorakit.base_identity": "md5:1234"})),
    )
    add(
        "valid_newer_minor.safetensors",
        "valid",
        "spec 1.7: read as 1.1 with warning LK302",
        *variant(edit_m=lambda m: m.update({"lorakit.spec_version": "1.7", "lorakit.future_key": "x"})),
    )
    add(
        "valid_user_metadata.safetensors",
        "valid",
        "free-form user metadata is kept",
        *variant(edit_m=lambda m: m.update({"trigger_words": "sks dog", "license": "mit"})),
    )

    good = file_bytes(*variant())
    add("invalid_truncated.safetensors", "LK102", "file cut in the middle of the data", raw=good[:-7])
    add("invalid_short.safetensors", "LK101", "5 bytes", raw=b"\x01\x02\x03\x04\x05")
    add(
        "invalid_header_not_json.safetensors",
        "LK101",
        "header is not JSON",
        raw=struct.pack("<Q", 16) + b"{not json at all",
    )
    add(
        "invalid_header_length.safetensors",
        "LK101",
        "header length past the end of the file",
        raw=struct.pack("<Q", 10**6) + b"{}",
    )
    add(
        "invalid_offsets_past_end.safetensors",
        "LK102",
        "data offsets beyond the file",
        raw=raw_file(
            {
                "__metadata__": {"lorakit.spec_version": "1.0"},
                "m.lora_A": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
            },
            b"\0" * 8,
        ),
    )
    add(
        "invalid_offsets_overlap.safetensors",
        "LK102",
        "two tensors share bytes",
        raw=raw_file(
            {
                "__metadata__": {"lorakit.spec_version": "1.0"},
                "m.lora_A": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
                "m.lora_B": {"dtype": "F32", "shape": [2, 1], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
    )
    duplicated = (
        b'{"__metadata__":{"lorakit.spec_version":"1.0"},'
        b'"m.lora_A":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},'
        b'"m.lora_A":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}'
    )
    add(
        "invalid_duplicate_key.safetensors",
        "LK107",
        "the same tensor name twice in the header",
        raw=struct.pack("<Q", len(duplicated)) + duplicated + b"\0" * 8,
    )
    add(
        "invalid_dtype_int.safetensors",
        "LK103",
        "integer factors",
        *variant(lambda t: t.update({"layers.0.q_proj.lora_A": t["layers.0.q_proj.lora_A"].to(torch.int32)})),
    )
    add(
        "invalid_missing_version.safetensors",
        "LK105",
        "no lorakit.spec_version (e.g. a PEFT file)",
        *variant(edit_m=lambda m: m.pop("lorakit.spec_version")),
    )
    add(
        "invalid_version_2.safetensors",
        "LK106",
        "a future major version",
        *variant(edit_m=lambda m: m.update({"lorakit.spec_version": "2.0"})),
    )
    add(
        "invalid_metadata_json.safetensors",
        "LK104",
        "lorakit.modules is not JSON",
        *variant(edit_m=lambda m: m.update({"lorakit.modules": "{oops"})),
    )
    add(
        "invalid_missing_B.safetensors",
        "LK201",
        "lora_A without lora_B",
        *variant(lambda t: t.pop("layers.0.q_proj.lora_B")),
    )
    add(
        "invalid_missing_alpha.safetensors",
        "LK202",
        "factors without alpha",
        *variant(lambda t: t.pop("layers.0.q_proj.alpha")),
    )
    add(
        "invalid_shape_ndim.safetensors",
        "LK203",
        "lora_A 3-D, lora_B 2-D",
        *variant(lambda t: t.update({"layers.0.q_proj.lora_A": torch.zeros(4, 16, 1)})),
    )
    add(
        "invalid_rank_mismatch.safetensors",
        "LK204",
        "A has rank 4, B rank 3",
        *variant(lambda t: t.update({"layers.0.q_proj.lora_B": torch.zeros(8, 3)})),
    )
    add(
        "invalid_zero_rank.safetensors",
        "LK205",
        "rank 0",
        *variant(
            lambda t: t.update(
                {"layers.0.q_proj.lora_A": torch.zeros(0, 16), "layers.0.q_proj.lora_B": torch.zeros(8, 0)}
            )
        ),
    )
    add(
        "invalid_alpha_negative.safetensors",
        "LK206",
        "alpha -8",
        *variant(lambda t: t.update({"layers.0.q_proj.alpha": torch.tensor(-8.0)})),
    )
    add(
        "invalid_alpha_nan.safetensors",
        "LK206",
        "alpha NaN",
        *variant(lambda t: t.update({"layers.0.q_proj.alpha": torch.tensor(float("nan"))})),
    )
    add(
        "invalid_alpha_fp16.safetensors",
        "LK207",
        "alpha stored in F16",
        *variant(lambda t: t.update({"layers.0.q_proj.alpha": torch.tensor(8.0, dtype=torch.float16)})),
    )
    add(
        "invalid_alpha_shape.safetensors",
        "LK207",
        "alpha of shape [1]",
        *variant(lambda t: t.update({"layers.0.q_proj.alpha": torch.tensor([8.0])})),
    )

    def nan_a(t):
        a = t["layers.0.q_proj.lora_A"].clone()
        a[1, 2] = float("nan")
        t["layers.0.q_proj.lora_A"] = a

    add("invalid_nan.safetensors", "LK208", "a NaN in lora_A", *variant(nan_a))
    add(
        "invalid_unknown_key.safetensors",
        "LK209",
        "a key outside the grammar",
        *variant(lambda t: t.update({"layers.0.q_proj.lora_C": torch.zeros(2)})),
    )
    add(
        "invalid_bias_shape.safetensors",
        "LK210",
        "bias_delta of the wrong length",
        *variant(lambda t: t.update({"layers.0.q_proj.bias_delta": torch.zeros(7)})),
    )
    add(
        "invalid_dora_no_axis.safetensors",
        "LK211",
        "dora_magnitude without dora_axis",
        *variant(lambda t: t.update({"layers.0.q_proj.dora_magnitude": torch.ones(8)})),
    )
    add(
        "invalid_kind.safetensors",
        "LK212",
        "kind conv with 2-D factors",
        *variant(edit_m=lambda m: m.update({"lorakit.modules": '{"layers.0.q_proj": {"kind": "conv"}}'})),
    )
    add(
        "valid_replacement_and_delta.safetensors",
        "valid",
        "a replaced weight with a delta on top (W' = R + dW)",
        *variant(lambda t: t.update({"layers.0.q_proj.weight.replacement": torch.ones(8, 16)})),
    )
    add(
        "invalid_replacement_shape.safetensors",
        "LK213",
        "a module's weight replacement of the wrong shape",
        *variant(lambda t: t.update({"layers.0.q_proj.weight.replacement": torch.zeros(8, 15)})),
    )
    _expert_vectors(add)
    return out


def _expert_vectors(add):
    """Spec 1.3: E experts of one projection as one `experts` module."""
    g = torch.Generator().manual_seed(2)
    ad = Adapter(base_model="lorakit/vectors", provenance=dict(PROVENANCE))
    for e in range(3):
        A, B = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
        ad.add(Module(f"layers.0.mlp.experts.{e}.up_proj", A, B, alpha=2.0 + e))
        ad.add(Module(f"layers.0.mlp.experts.down_proj.{e}", B.T.contiguous(), A.T.contiguous(), alpha=4.0))
    tensors, meta = to_tensors(ad)
    group = "layers.0.mlp.experts.*.up_proj"

    def edit(t_edit=None, m_edit=None):
        return edited(tensors, meta, t_edit, m_edit)

    def kinds(extra):
        return lambda m: m.update(
            {"lorakit.modules": json.dumps({**json.loads(m["lorakit.modules"]), **extra})}
        )

    add(
        "valid_experts.safetensors",
        "valid",
        "spec 1.3: two experts modules (per-expert names, rows of a fused tensor), alphas per expert and shared",
        tensors,
        meta,
    )
    add(
        "invalid_experts_shape.safetensors",
        "LK214",
        "an experts module whose lora_B has another expert count than lora_A",
        *edit(lambda t: t.update({f"{group}.lora_B": t[f"{group}.lora_B"][:2]})),
    )
    add(
        "invalid_experts_name.safetensors",
        "LK214",
        "an experts module whose name has no '*'",
        *edit(
            lambda t: t.update({k.replace("*.", ""): t.pop(k) for k in list(t) if k.startswith(group)}),
            lambda m: m.update(
                {
                    "lorakit.modules": m["lorakit.modules"].replace(
                        '"layers.0.mlp.experts.*.up_proj"', '"layers.0.mlp.experts.up_proj"'
                    )
                }
            ),
        ),
    )
    add(
        "invalid_experts_alpha_shape.safetensors",
        "LK207",
        "an experts module with 2 alphas for 3 experts",
        *edit(lambda t: t.update({f"{group}.alpha": torch.tensor([1.0, 2.0])})),
    )
    add(
        "invalid_experts_alpha_zero.safetensors",
        "LK206",
        "an experts module with one expert's alpha 0",
        *edit(lambda t: t.update({f"{group}.alpha": torch.tensor([1.0, 0.0, 2.0])})),
    )
    add(
        "invalid_experts_collision.safetensors",
        "LK214",
        "expert 1 of an experts module is also a linear module",
        *edit(
            lambda t: t.update(
                {
                    "layers.0.mlp.experts.1.up_proj." + p: t[f"layers.0.mlp.experts.down_proj.*.{p}"][0]
                    for p in ("lora_A", "lora_B")
                }
                | {"layers.0.mlp.experts.1.up_proj.alpha": torch.tensor(1.0)}
            ),
            kinds({"layers.0.mlp.experts.1.up_proj": {"kind": "linear"}}),
        ),
    )
    add(
        "invalid_experts_bias.safetensors",
        "LK214",
        "an experts module with a bias_delta",
        *edit(lambda t: t.update({f"{group}.bias_delta": torch.zeros(8)})),
    )


def main(folder):
    os.makedirs(folder, exist_ok=True)
    manifest = {}
    for name, (expect, description, data) in sorted(vectors().items()):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        manifest[name] = {"expect": expect, "description": description}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate the conformance vectors and manifest.json.")
    parser.add_argument(
        "out_dir",
        nargs="?",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder to write the vectors in (default: this script's folder)",
    )
    main(parser.parse_args().out_dir)
