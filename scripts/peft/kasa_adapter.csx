// PEFT interop for the KaSA sample (samples/KasaVariant), our half; run by scripts/peft/check_variant.sh with the sample
// on LORAHUB_PLUGIN_PATH:
//   save <base> <out>      : attach "kasa" with random weights, save it in PEFT's format, write logits.json
//   check <base> <adapter> : load a PEFT-saved KaSA adapter (claimed by folder), compare our logits with its logits.json
// Both sides truncate the base weights by SVD when the adapter is attached or loaded, so the logits compared are those of
// the truncated base plus the adapter.
using System.Text.Json;
using LoRAHub.Models;

var mode = Args[0];
var baseModel = Args[1];
var folder = Args[2];
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
    var adapter = Method("kasa").Attach(model, new
    {
        r = 4, lora_alpha = 8, target_modules = new[] { "q_proj", "v_proj", "down_proj" }, init_lora_weights = false,
        kasa_config = new { beta = 0.0002, gamma = 0.002 },
    });
    // Move every trained tensor (A, B and the diagonal) away from its start, so each shows in the logits.
    using (torch.no_grad())
        foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.add_(torch.randn(p.shape) * 0.05);
    adapter.Save(folder);
    File.WriteAllText(Path.Combine(folder, "logits.json"), JsonSerializer.Serialize(new { input_ids = ids, logits = Logits() }));
    Output($"saved our KaSA adapter to {folder}");
}
else
{
    // PEFT picks the method from the saved folder; so do we: exactly one plugin must claim it (kasa_config set).
    var claimed = Methods.ForFolder(folder);
    if (claimed.Name != "kasa") throw new Exception($"{folder} was claimed by '{claimed.Name}', expected 'kasa'");
    var adapter = claimed.Load(model, folder);
    using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "logits.json")));
    var expected = doc.RootElement.GetProperty("logits").EnumerateArray().Select(e => e.GetSingle()).ToArray();
    var ours = Logits();
    var maxDiff = expected.Zip(ours).Max(p => Math.Abs(p.First - p.Second));
    float[] baseline;
    using (adapter.DisableAdapter()) baseline = Logits();   // the truncated base (KaSA's truncation stays, as in PEFT)
    var adapterEffect = expected.Zip(baseline).Max(p => Math.Abs(p.First - p.Second));
    Output($"PEFT-saved KaSA adapter loaded here: max |logit diff| = {maxDiff:E2} (the adapter itself moves logits by up to {adapterEffect:E2})");
    if (maxDiff > 1e-4 || adapterEffect < 1e-3) throw new Exception("PEFT KaSA adapter logits do not match");
}
