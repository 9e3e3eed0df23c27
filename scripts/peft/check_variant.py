"""PEFT interop for the KaSA sample, Python half: loads LoRAHub's KaSA adapter in PEFT and compares logits; saves a PEFT
KaSA adapter (with logits) for LoRAHub to load. Usage: python3 check_variant.py BASE_MODEL OUR_ADAPTER PEFT_ADAPTER_OUT
Needs a PEFT whose LoraConfig has kasa_config (KaSA landed in PEFT after 0.20; the 0.21 releases carry it)."""
import json, sys
import torch
import peft
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

try:
    from peft import KasaConfig
except ImportError:
    sys.exit(f"PEFT {peft.__version__} has no KaSA (LoraConfig.kasa_config); install a PEFT release that has it (0.21 or later)")

base_path, ours, out = sys.argv[1:4]

def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.reshape(-1)

# 1. Our adapter in PEFT: PEFT truncates the base by SVD as it loads (as we did when attaching), then same logits.
base = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, ours)
saved = json.load(open(f"{ours}/logits.json"))
ids = saved["input_ids"]
diff = (logits(model, ids) - torch.tensor(saved["logits"])).abs().max().item()
config = json.load(open(f"{ours}/adapter_config.json"))
print(json.dumps(dict(check="lorahub kasa adapter in peft", max_abs_logit_diff=diff, peft_type=config["peft_type"], r=config["r"],
                      kasa_config=config.get("kasa_config"))))
assert config.get("kasa_config") == {"beta": 0.0002, "gamma": 0.002}, config.get("kasa_config")
assert isinstance(model.peft_config["default"].kasa_config, KasaConfig)
assert diff < 1e-4, diff

# 2. A PEFT KaSA adapter (random A, B and diagonal) for LoRAHub to load.
torch.manual_seed(5)
base = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False,
                 kasa_config=KasaConfig(), task_type="CAUSAL_LM")
peft_model = get_peft_model(base, cfg)
peft_model.save_pretrained(out)
json.dump(dict(input_ids=ids, logits=logits(peft_model, ids).tolist()), open(f"{out}/logits.json", "w"))
print(json.dumps(dict(check="peft kasa adapter saved", path=out)))
