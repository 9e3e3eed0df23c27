// PEFT interop for multi-head-aware LoRA ("headlora"), our half; run by scripts/peft/check_headlora.sh:
//   <base> <out> : on the tiny Llama at <base> (4 query heads, 2 key-value heads of head_dim 8), attach headlora twice and
//                  export each in PEFT's LoRA format (save_format "lora") with our logits (logits.json):
//                  <out>/fixed    uneven per-head ranks (heads of rank 0, GQA k/v, o split by input, a plain MLP layer)
//                  <out>/adaptive the adaptive budget trained for a few steps, so pruned components are left out
using System.Text.Json;
using LoRAHub.Models;

var baseModel = Args[0];
var outDir = Args[1];
long[] ids = [1, 5, 9, 14, 3, 27, 8, 2];

void Export(string name, object options, int trainSteps)
{
    var model = PretrainedModel.LoadLlama(baseModel, device: CPU);
    float[] Logits()
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        return model.Forward(torch.tensor(ids, [1, ids.Length])).reshape(-1).data<float>().ToArray();
    }
    var baseline = Logits();
    torchx.manual_seed(11);
    var adapter = Method("headlora").Attach(model, options);
    // Move every tensor away from its start (B = 0, E = 0), so each head's block shows in the logits.
    using (torch.no_grad())
        foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.add_(torch.randn(p.shape) * 0.3);
    // A few plain SGD steps on next-token loss drive the adaptive budget (importance after backward, masking after the step).
    var input = torch.tensor(ids, [1, ids.Length]);
    for (var step = 0; step < trainSteps; step++)
    {
        using var scope = torch.NewDisposeScope();
        model.Root.train();
        var logits = model.Forward(input.narrow(1, 0, ids.Length - 1));
        var loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), input.narrow(1, 1, ids.Length - 1).reshape(-1));
        loss.backward();
        adapter.OnAfterBackward(step);
        using (torch.no_grad())
            foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters))
                if (p.grad is { } g)
                {
                    p.add_(g, alpha: -0.05);
                    g.zero_();
                }
        adapter.OnStepEnd(step);
    }
    model.Root.eval();
    var folder = Path.Combine(outDir, name);
    adapter.Save(folder); // save_format "lora": PEFT's LoRA format
    var ours = Logits();
    var effect = ours.Zip(baseline).Max(p => Math.Abs(p.First - p.Second));
    if (effect < 1e-3) throw new Exception($"{name}: the adapter does not change the logits (max {effect:E2}); nothing would be checked");
    File.WriteAllText(Path.Combine(folder, "logits.json"), JsonSerializer.Serialize(new { input_ids = ids, logits = ours }));
    Output($"{name}: exported headlora as PEFT LoRA to {folder} (the adapter moves logits by up to {effect:E2})");
    adapter.Dispose();
}

var targets = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "down_proj" };
Export("fixed", new
{
    r = 2, lora_alpha = 6, use_rslora = true, save_format = "lora", target_modules = targets,
    head_ranks = new Dictionary<string, int[]> { ["q_proj"] = [3, 0, 1, 2], ["v_proj"] = [4, 1], ["layers\\.1\\.self_attn\\.o_proj"] = [1, 2, 0, 5], ["down_proj"] = [5] },
}, trainSteps: 0);
Export("adaptive", new
{
    adaptive = true, init_r = 4, target_r = 2, total_step = 12, tinit = 2, tfinal = 3, lora_alpha = 8, save_format = "lora", target_modules = targets,
}, trainSteps: 12);
