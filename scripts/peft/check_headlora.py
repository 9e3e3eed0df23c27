"""PEFT interop for multi-head-aware LoRA, Python half: each folder is a headlora adapter exported by LoRAHub in PEFT's
LoRA format (scripts/peft/headlora_adapter.csx); PEFT loads it on the same base with no missing or unexpected keys and
gives LoRAHub's logits (fp32, within 1e-4). Usage: python3 check_headlora.py BASE_MODEL EXPORT_DIR [EXPORT_DIR ...]"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

base_path, folders = sys.argv[1], sys.argv[2:]
for folder in folders:
    config = json.load(open(f"{folder}/adapter_config.json"))
    assert config["peft_type"] == "LORA", config["peft_type"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder)
    saved = json.load(open(f"{folder}/logits.json"))
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([saved["input_ids"]])).logits.reshape(-1)
    diff = (ours - torch.tensor(saved["logits"])).abs().max().item()
    ranks = {name: module.r["default"] for name, module in model.named_modules() if hasattr(module, "r") and isinstance(module.r, dict)}
    print(json.dumps(dict(check="lorahub headlora export in peft", folder=folder, max_abs_logit_diff=diff, layers=len(ranks),
                          ranks=sorted(set(ranks.values())), rank_pattern=len(config.get("rank_pattern") or {}))))
    assert len(ranks) > 0
    assert diff < 1e-4, diff
print("PEFT interop (headlora): the exported adapters give our logits in PEFT")
