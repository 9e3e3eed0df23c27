// PEFT interop, our half (run by scripts/peft/check.sh on a machine with Python PEFT):
//   save <base> <out> [lora|dora|adalora]      : attach the method with random weights, save it in PEFT's format, write logits.json
//   check <base> <adapter> [lora|dora|adalora] : load a PEFT-saved adapter, compare our logits with its logits.json
using System.Text.Json;
using LoRAHub.Models;

var mode = Args[0];
var baseModel = Args[1];
var folder = Args[2];
var method = Args.Length > 3 ? Args[3] : "lora";
var model = PretrainedModel.LoadLlama(baseModel, device: CPU);
long[] ids = [1, 5, 9, 14, 3, 27, 8, 2];
float[] Logits()
{
    using var scope = torch.NewDisposeScope();
    using var _ = torch.no_grad();
    return model.Forward(torch.tensor(ids, [1, ids.Length])).reshape(-1).data<float>().ToArray();
}

if (mode == "save")
{
    torchx.manual_seed(11);
    object options = method == "adalora"
        ? new { init_r = 4, target_r = 2, total_step = 10, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj", "down_proj" } }
        : new { r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj", "down_proj" }, init_lora_weights = false };
    var adapter = Method(method).Attach(model, options);
    // Move every trained tensor (DoRA's magnitudes, AdaLoRA's small init too) away from its start, so each shows in the logits.
    using (torch.no_grad())
        foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.add_(torch.randn(p.shape) * (method == "adalora" ? 0.5 : 0.05));
    adapter.Save(folder);
    File.WriteAllText(Path.Combine(folder, "logits.json"), JsonSerializer.Serialize(new { input_ids = ids, logits = Logits() }));
    Output($"saved our adapter to {folder}");
}
else
{
    // PEFT picks the method from the saved folder; so do we: exactly one plugin must claim a PEFT-saved folder.
    var claimed = Methods.ForFolder(folder);
    if (!string.Equals(claimed.Name, method, StringComparison.OrdinalIgnoreCase))
        throw new Exception($"{folder} was claimed by '{claimed.Name}', expected '{method}'");
    var adapter = claimed.Load(model, folder);
    using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "logits.json")));
    var expected = doc.RootElement.GetProperty("logits").EnumerateArray().Select(e => e.GetSingle()).ToArray();
    var ours = Logits();
    var maxDiff = expected.Zip(ours).Max(p => Math.Abs(p.First - p.Second));
    float[] baseline;
    using (adapter.DisableAdapter()) baseline = Logits();
    var adapterEffect = expected.Zip(baseline).Max(p => Math.Abs(p.First - p.Second));
    Output($"PEFT-saved adapter loaded here: max |logit diff| = {maxDiff:E2} (the adapter itself moves logits by up to {adapterEffect:E2})");
    if (maxDiff > 1e-4 || adapterEffect < 1e-3) throw new Exception("PEFT adapter logits do not match");
}
