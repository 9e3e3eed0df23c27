"""PEFT interop, Python half: loads LoRAHub's adapter in PEFT and compares logits; saves a PEFT adapter (with logits)
for LoRAHub to load. Usage: python3 check_peft.py BASE_MODEL OUR_ADAPTER PEFT_ADAPTER_OUT [lora|dora|adalora]"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model

base_path, ours, out = sys.argv[1:4]
method = sys.argv[4] if len(sys.argv) > 4 else "lora"
use_dora = method == "dora"

def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.reshape(-1)

# 1. Our adapter in PEFT: no missing or unexpected keys, same logits.
base = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, ours)
saved = json.load(open(f"{ours}/logits.json"))
ids = saved["input_ids"]
diff = (logits(model, ids) - torch.tensor(saved["logits"])).abs().max().item()
config = json.load(open(f"{ours}/adapter_config.json"))
print(json.dumps(dict(check="lorahub adapter in peft", max_abs_logit_diff=diff, peft_type=config["peft_type"], r=config["r"],
                      use_dora=config.get("use_dora"))))
assert config.get("use_dora", False) == use_dora
assert diff < 1e-4, diff

# 2. A PEFT adapter (random A and B) for LoRAHub to load.
torch.manual_seed(5)
base = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
if method == "adalora":
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                        task_type="CAUSAL_LM")
else:
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False,
                     use_dora=use_dora, task_type="CAUSAL_LM")
peft_model = get_peft_model(base, cfg)
with torch.no_grad():  # DoRA's magnitudes and AdaLoRA's E start where they change nothing; move them
    for name, p in peft_model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.add_(0.05 * torch.randn_like(p))
        elif method == "adalora" and "lora_" in name:
            p.add_(0.5 * torch.randn_like(p))
peft_model.save_pretrained(out)
json.dump(dict(input_ids=ids, logits=logits(peft_model, ids).tolist()), open(f"{out}/logits.json", "w"))
print(json.dumps(dict(check="peft adapter saved", path=out)))
