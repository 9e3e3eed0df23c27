"""The main job's merged folder is an ordinary Hugging Face model: transformers loads it (no PEFT, no LoRAHub) and its
logits equal those of PEFT applying the job's saved adapter to the base model.
Usage: check_merged.py BASE_MODEL_DIR ADAPTER_DIR MERGED_DIR   (prints one JSON line; exit 1 on a mismatch)"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
torch.manual_seed(0)
merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
ids = torch.randint(0, merged.config.vocab_size, (2, 24))
with torch.no_grad():
    ours = merged(input_ids=ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32), adapter_dir).eval()
    reference = peft(input_ids=ids).logits
    base = peft.get_base_model()
    with peft.disable_adapter():
        untouched = peft(input_ids=ids).logits
diff = (ours - reference).abs().max().item()
moved = (reference - untouched).abs().max().item()
print(json.dumps({"check": "merged folder in transformers vs PEFT(base + adapter)", "max_abs_logit_diff": diff,
                  "adapter_moves_logits_by": moved, "keys": len(merged.state_dict())}))
# fp32 merge reorders the sums: logits of magnitude ~20 agree to ~1e-5 relative.
sys.exit(0 if diff < 1e-3 and moved > 1e-2 else 1)
