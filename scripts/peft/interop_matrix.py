"""PEFT interop matrix (issue 17): LoRA and DoRA on Llama, Qwen2, Mistral (sliding_window 4, inputs longer than it) and
GPT-2 (Conv1D, fan_in_fan_out), over rank/alpha patterns, rsLoRA, layers_to_transform, bias modes, lora_bias,
modules_to_save (also lm_head on models with tied embeddings: Llama with tie_word_embeddings and GPT-2),
trainable_token_indices (list form; dict form on an untied model; on tied models the head follows the rows) and every
init PEFT can save and reload (true, false, gaussian, pissa, olora, orthogonal; loftq when bitsandbytes is installed).
Per case:
  1. our adapter (saved by LoRAHub) loads in PEFT with our logits              (max |diff| < 1e-4, fp32)
  2. PEFT's adapter (saved by PEFT) loads in LoRAHub with PEFT's logits          (max |diff| < 1e-4, fp32)
  3. our merged folder loads in plain transformers with the logits of PEFT's merge_and_unload of our adapter (< 1e-4)
Usage (from the repo root, LORAHUB_HOST = the host command, e.g. "dotnet .publish/host/loraHub.dll run"):
  python3 scripts/peft/interop_matrix.py WORK_DIR        (prints one JSON line per check; exit 1 if any fails)
  MATRIX_CASES=tied,trainable_tokens,loftq ...           (only cases whose name contains one of the words)
A case that fails on either side is reported as a failed JSON line and the run goes on (the PEFT-to-LoRAHub half runs
for every case PEFT could save). Not covered, with the reason: pissa_niter_N (PEFT redoes a randomized SVD on load, so
neither side can rebuild the residual the adapter was trained on; PEFT's own reload differs too), corda/eva/lora_ga
(need data)."""
import json, os, shlex, subprocess, sys, traceback
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

try:  # PEFT's LoftQ quantizes with bitsandbytes (on CUDA)
    import bitsandbytes  # noqa: F401
    HAVE_BNB = torch.cuda.is_available()
except Exception:
    HAVE_BNB = False

work = sys.argv[1]
host = shlex.split(os.environ["LORAHUB_HOST"])
fixtures = "tests/LoRAHub.Models.Tests/fixtures"
os.makedirs(work, exist_ok=True)
IDS = [1, 5, 9, 14, 3, 27, 8, 2, 40, 33, 17, 60]  # 12 tokens: longer than Mistral's window of 4

# Mistral with a small sliding window (the fixture has none): same weights, sliding_window 4.
mistral_sw = f"{work}/mistral_sw"
cfg = AutoConfig.from_pretrained(f"{fixtures}/mistral")
cfg.sliding_window = 4
AutoModelForCausalLM.from_pretrained(f"{fixtures}/mistral", config=cfg, torch_dtype=torch.float32).save_pretrained(mistral_sw)

MODELS = {
    "llama": dict(path=f"{fixtures}/llama", targets=["q_proj", "v_proj", "down_proj"], layers="layers", save="lm_head",
                  patterns=dict(rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})),
    # tie_word_embeddings true: lm_head in modules_to_save is an untied copy; trainable tokens reach the tied head.
    "llama_tied": dict(path=f"{fixtures}/llama_tied", targets=["q_proj", "v_proj", "down_proj"], layers="layers", save="lm_head",
                       patterns=dict(rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})),
    "qwen2": dict(path=f"{fixtures}/qwen2", targets=["q_proj", "k_proj", "v_proj", "o_proj"], layers="layers", save="lm_head",
                  patterns=dict(rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"k_proj": 16})),
    "mistral": dict(path=mistral_sw, targets=["q_proj", "v_proj", "up_proj"], layers="layers", save="lm_head",
                    patterns=dict(rank_pattern={"up_proj": 6}, alpha_pattern={"q_proj": 4})),
    # GPT-2: Conv1D (PEFT sets fan_in_fan_out), lm_head tied to wte (ln_f as a second saved module; lm_head below).
    "gpt2": dict(path=f"{fixtures}/gpt2", targets=["c_attn", "c_proj", "c_fc"], layers="h", save="ln_f",
                 patterns=dict(rank_pattern={"c_fc": 2}, alpha_pattern={r"h\.0\.attn\.c_proj": 2})),
}

def variants(model, method):
    m = MODELS[model]
    base = dict(r=4, lora_alpha=8, target_modules=m["targets"], init_lora_weights=False)
    yield "plain", base
    yield "patterns_rslora_layers", {**base, **m["patterns"], "use_rslora": True, "layers_to_transform": [1],
                                     "layers_pattern": m["layers"]}
    yield "bias_all", {**base, "bias": "all"}
    yield "bias_lora_only", {**base, "bias": "lora_only"}
    yield "modules_to_save", {**base, "modules_to_save": [m["save"]]}
    if model == "gpt2":
        yield "modules_to_save_tied_lm_head", {**base, "modules_to_save": ["lm_head"]}
    if model == "llama_tied" and method == "lora":  # PEFT's default: the head keeps the original table
        yield "modules_to_save_tied_embedding", {**base, "modules_to_save": ["embed_tokens"]}
    if method == "lora":
        yield "trainable_tokens", {**base, "trainable_token_indices": [1, 5, 9, 40]}
        if model == "llama":  # untied: rows of the embedding and, separately, of lm_head
            yield "trainable_tokens_dict", {**base, "trainable_token_indices": {"embed_tokens": [1, 5], "lm_head": [9, 33]}}
        if model in ("llama", "llama_tied") and HAVE_BNB:
            yield "init_loftq", {**base, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
        if model in ("qwen2", "gpt2"):  # only layers with a bias: merging lora_bias adds to the base bias
            yield "lora_bias", {**base, "lora_bias": True,
                                "target_modules": ["q_proj", "k_proj", "v_proj"] if model == "qwen2" else m["targets"]}
        for init in (True, "gaussian", "pissa", "olora", "orthogonal"):
            if init == "olora" and model == "gpt2":
                # PEFT 0.21's OLoRA init ignores fan_in_fan_out: on GPT-2's Conv1D its own model gets lora_A of shape
                # (r, out_features) and cannot run a forward, so there is nothing to compare with (seen 2026-11-30).
                continue
            yield f"init_{init}", {**base, "init_lora_weights": init}
        # PEFT's conversion (path_initial_model_for_weight_conversion): a plain rank-2r LoRA on the original base.
        yield "init_pissa_converted", {**base, "init_lora_weights": "pissa", "use_rslora": True}
    else:
        yield "init_pissa", {**base, "init_lora_weights": "pissa"}

cases = []
for model in MODELS:
    for method in ("lora", "dora"):
        for variant, options in variants(model, method):
            name = f"{model}-{method}-{variant}"
            cases.append(dict(name=name, model=model, base=MODELS[model]["path"], method=method, options=options,
                              convert=variant.endswith("_converted"),
                              ours=f"{work}/{name}/ours", merged=f"{work}/{name}/merged", peft=f"{work}/{name}/peft", ids=IDS))
# MATRIX_CASES="tied,trainable_tokens,loftq": only the cases whose name contains one of these (a shorter run).
if os.environ.get("MATRIX_CASES"):
    wanted = [w for w in os.environ["MATRIX_CASES"].split(",") if w]
    cases = [c for c in cases if any(w in c["name"] for w in wanted)]
print(json.dumps(dict(progress="cases", count=len(cases), loftq=HAVE_BNB)), flush=True)
json.dump(cases, open(f"{work}/cases.json", "w"), indent=1)

def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.reshape(-1).float()

def load_base(path):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()

failures = []
def report(case, check, diff, moved=None, tol=1e-4):
    ok = diff < tol and (moved is None or moved > 1e-3)
    print(json.dumps(dict(case=case["name"], check=check, max_abs_logit_diff=diff, adapter_moves_logits_by=moved, ok=ok)), flush=True)
    if not ok:
        failures.append((case["name"], check))

# 1 + 3: LoRAHub saves every case (adapter, logits, merged folder) in one host run; PEFT checks them.
saving = subprocess.run(host + ["scripts/peft/interop_matrix.csx", "save", f"{work}/cases.json"])
if saving.returncode != 0:  # the cases it did save are still checked; the rest fail below without logits.json
    print(json.dumps(dict(check="lorahub saves the adapters", exit=saving.returncode, ok=False)), flush=True)
    failures.append(("host save", f"exit {saving.returncode}"))
for case in cases:
    try:
        ours = json.load(open(f"{case['ours']}/logits.json"))
        peft = PeftModel.from_pretrained(load_base(case["base"]), case["ours"]).eval()
        expected = torch.tensor(ours["logits"])
        got = logits(peft)
        with peft.disable_adapter():
            untouched = logits(peft)
        report(case, "lorahub adapter in peft", (got - expected).abs().max().item(), (got - untouched).abs().max().item())
        reference = logits(peft.merge_and_unload())
        merged = logits(AutoModelForCausalLM.from_pretrained(case["merged"], torch_dtype=torch.float32, attn_implementation="eager").eval())
        report(case, "lorahub merged folder in transformers vs peft merge_and_unload", (merged - reference).abs().max().item())
    except Exception as e:  # one broken case must not hide the others
        print(json.dumps(dict(case=case["name"], check="lorahub adapter in peft", error=repr(e), ok=False)), flush=True)
        failures.append((case["name"], "lorahub adapter in peft"))

# 2: PEFT saves every case with trained-looking weights and its logits; LoRAHub loads and compares. A case PEFT cannot
# save is reported and left out of the check; the others go on.
saved_by_peft = []
for i, case in enumerate(cases):
    try:
        torch.manual_seed(100 + i)
        base = load_base(case["base"])
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", use_dora=case["method"] == "dora", **case["options"]))
        if case["convert"]:  # PEFT's recipe: save the initial adapter with init_lora_weights=True before training
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(case["peft"] + "_init")
            model.peft_config["default"].init_lora_weights = case["options"]["init_lora_weights"]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        model.eval()
        if case["convert"]:
            model.save_pretrained(case["peft"], path_initial_model_for_weight_conversion=case["peft"] + "_init")
        else:
            model.save_pretrained(case["peft"])
        json.dump(dict(input_ids=IDS, logits=logits(model).tolist()), open(f"{case['peft']}/logits.json", "w"))
        saved_by_peft.append(case)
    except Exception as e:
        print(json.dumps(dict(case=case["name"], check="peft saves the adapter", error=repr(e),
                              where=traceback.format_exc().splitlines()[-3:], ok=False)), flush=True)
        failures.append((case["name"], "peft saves the adapter"))
json.dump(saved_by_peft, open(f"{work}/cases_peft.json", "w"), indent=1)
print(json.dumps(dict(progress="peft saved its adapters", cases=len(saved_by_peft))), flush=True)
result = subprocess.run(host + ["scripts/peft/interop_matrix.csx", "check", f"{work}/cases_peft.json"], capture_output=True, text=True)
sys.stdout.write(result.stdout)
sys.stderr.write(result.stderr)
for line in result.stdout.splitlines():
    if line.startswith("{") and '"ok": false' in line:
        failures.append((json.loads(line)["case"], "peft adapter in lorahub"))
if result.returncode != 0 and not failures:
    failures.append(("host", f"exit {result.returncode}"))

print(json.dumps(dict(summary="peft interop matrix", cases=len(cases), checks=3 * len(cases), failures=failures)))
sys.exit(1 if failures else 0)
